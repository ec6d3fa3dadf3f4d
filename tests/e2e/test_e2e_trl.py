"""TRL interop: TRL's GRPOTrainer (PyTorch) trains a policy with `haf_jax.export`'s reward_model
directory as its reward model, and the rewards it computes equal `haf_jax.score`'s reward_chosen
for the same prompt and completion texts.

The export's tokenizers render conversations in the run's training format (haf_jax/data/chat_format.py),
so TRL's conversational path (prompts as chat messages) reads the reward where the data layer does: at
the EOS after BOS + prompt + response. The policy is the export's own policy head (the tiny Gemma of
run A, float32), two GRPO steps of 4 prompts x 2 completions of at most 8 tokens, on CPU, offline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.runs import score_rows

PROMPTS = [
    "\n\nHuman: What is a good name for a cat?\n\nAssistant:",
    "\n\nHuman: How do I boil an egg?\n\nAssistant:",
    "\n\nHuman: Can you help me with my homework?\n\nAssistant:",
    "\n\nHuman: Why is the sky blue?\n\nAssistant:",
]


def test_grpo_trainer_rewards_from_export_equal_score(run_a, one_device, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from haf_jax.data import load_tokenizer
    from haf_jax.data.tokenize import encode_pairs
    from haf_jax.evaluation.export import export
    from haf_jax.evaluation.scoring import score

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "export"
    export(str(run_a), str(out))
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    train = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    trainer = trl.GRPOTrainer(
        model=str(out / "policy"), reward_funcs=str(out / "reward_model"), args=args, train_dataset=train
    )

    seen, reward_ids = [], []  # (prompt text, completion text, reward) as TRL computed them; its input ids

    def rewards(inputs, prompts, completions, completion_ids):
        r = calculate(inputs, prompts, completions, completion_ids)
        for p, c, value in zip(prompts, completions, r[:, 0].tolist()):
            assert [m["role"] for m in p] == ["user"] and [m["role"] for m in c] == ["assistant"]
            seen.append((p[0]["content"], c[0]["content"], value))
        return r

    def keep_ids(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        reward_ids.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))

    calculate = trainer._calculate_rewards
    monkeypatch.setattr(trainer, "_calculate_rewards", rewards)
    trainer.reward_funcs[0].register_forward_pre_hook(keep_ids, with_kwargs=True)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(seen) == len(reward_ids) == 2 * 4  # two steps of 4 completions (2 prompts x 2 generations)

    # TRL's reward input is the data layer's chosen sequence: BOS + prompt + completion + EOS
    tok = load_tokenizer(str(out / "reward_model"))
    scored = [(p, c) for p, c, _ in seen if c.strip()]  # an empty completion is no pair for `score`
    assert len(scored) >= 6, seen
    pairs = [{"prompt": p, "chosen": c, "rejected": c + " No."} for p, c in scored]
    enc = encode_pairs(tok, pairs, max_length=512, max_prompt_length=128)
    by_text = {(p, c): ids for (p, c, _), ids in zip(seen, reward_ids)}
    for k, (p, c) in enumerate(scored):
        assert by_text[p, c] == [*enc.prompt[k].tolist(), *enc.chosen[k].tolist()], (p, c)
        assert by_text[p, c][-1] == tok.eos_token_id

    data = tmp_path / "completions.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    score(str(run_a), str(data), str(tmp_path / "scores.jsonl"), batch_size=8)
    ours = np.array([row["reward_chosen"] for row in score_rows(tmp_path / "scores.jsonl")])
    theirs = np.array([r for _, c, r in seen if c.strip()])
    assert np.ptp(ours) > 1e-3  # distinct completions get distinct rewards: the comparison means something
    err = np.abs(theirs - ours).max()
    print(f"TRL vs haf_jax score reward_chosen: max abs error {err:.2e} over {len(ours)} completions")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
