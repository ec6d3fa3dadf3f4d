"""End-to-end LoRA runs (`--config.model.lora.rank`): step 1 is the base model, only adapters and
the reward head move, resume is bit-exact and refuses another base, and the exports (merged
Hugging Face checkpoints and the PEFT adapter) score like haf_jax in transformers and peft.

One base checkpoint (the tiny Gemma preset, random weights, the bundled tokenizer) written as a
Hugging Face directory; one uninterrupted LoRA run shared by the tests (built once under xdist;
both are fixtures of tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from helpers.runs import (
    LORA,
    LORA_EVAL_EVERY,
    LORA_STEPS,
    kill_after_checkpoint,
    rows,
    score_rows,
    train_rows,
    transformers_scores,
)

STEPS, EVAL_EVERY = LORA_STEPS, LORA_EVAL_EVERY


def test_lora_run_trains_adapters_and_head_only(lora_run, lora_base):
    first = train_rows(lora_run)[1]
    assert first["reward_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["policy_loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at B = 0: policy == base
    assert all(math.isfinite(r["loss"]) for r in train_rows(lora_run).values())

    import jax
    from flax import traverse_util

    from haf_jax.core import sharding
    from haf_jax.evaluation.loading import load_model
    from haf_jax.model import hf, lora as lora_lib

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    loaded = load_model(str(lora_run), mesh, which="last", float32=True)
    merged, config = loaded.params, loaded.model_cfg
    base, _ = hf.load_params(lora_base, config)
    targets = set(lora_lib.targets(config, loaded.lora.config))
    assert targets == {f"layers_{i}/mlp/{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    flat_merged, flat_base = (traverse_util.flatten_dict(jax.device_get(t), sep="/") for t in (merged, base))
    changed = {k for k in flat_base if not np.array_equal(flat_merged[k], flat_base[k])}
    assert changed == targets | {"reward_head"}
    # the checkpoint holds adapters and the head only, with a fingerprint of the base
    meta = json.loads((lora_run / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    params = {k for k in meta["layout"] if k.startswith("['params']")}
    assert params and all(k.startswith(("['params']['lora']", "['params']['reward_head']")) for k in params)
    saved = json.loads((lora_run / "checkpoints" / str(STEPS) / "config" / "metadata").read_text())
    assert saved["base_weights"] and saved["model"]["lora"]["rank"] == 4


def test_lora_resume_is_bit_exact_and_refuses_another_base(lora_run, lora_base, runner, one_device, tmp_path, capsys):
    extra = [*LORA, f"--config.model.checkpoint={lora_base}"]
    workdir = kill_after_checkpoint(runner, tmp_path, lambda step: step >= EVAL_EVERY, *extra, steps=STEPS)
    p = runner.train(workdir, *extra)  # a child: its numbers are compared bit for bit with lora_run's
    assert "resumed from" in p.stderr, p.stderr[-3000:]
    ours, theirs = train_rows(workdir), train_rows(lora_run)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for s in ours:
        for k in ("loss", "reward_loss", "policy_loss", "grad_norm"):
            assert ours[s][k] == theirs[s][k], (s, k)
    assert [r for r in rows(workdir) if r.get("split") == "eval"] == [
        r for r in rows(lora_run) if r.get("split") == "eval"
    ]

    # the same run on other base weights (one tensor changed) is refused, with the reason
    other = tmp_path / "other_base"
    shutil.copytree(lora_base, other)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.5
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # the command's contract: one error line, no traceback
        runner.invoke_train(workdir, *LORA, f"--config.model.checkpoint={other}")
    err = capsys.readouterr().err
    assert exited.value.code != 0 and "Traceback" not in err
    assert "LoRA adapters trained on other base weights" in err, err[-2000:]


def test_lora_exports_score_like_the_run(lora_run, lora_base, small_data, one_device, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from haf_jax.evaluation.export import export
    from haf_jax.evaluation.scoring import score

    out = tmp_path / "export"
    info = export(str(lora_run), str(out), which="last")  # what `haf_jax.export` prints as its last line
    assert info["adapter"] == str(out / "adapter")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(small_data.read_text().splitlines(keepends=True)[:6]))
    scores = tmp_path / "scores.jsonl"
    score(str(lora_run), str(pairs), str(scores), step="last", max_length=64, max_prompt_length=32, batch_size=4)
    ours = score_rows(scores)
    assert len(ours) == 6

    # merged checkpoints in transformers: rewards and summed log-probs
    got = transformers_scores(out, pairs, max_length=64, max_prompt_length=32)
    for i, row in enumerate(ours):
        reward, logp = got[i]
        for j, side in enumerate(("chosen", "rejected")):
            # 10x the unit parity tolerances (test_model_hf.py: measured <= 2.2e-6 / 2.0e-5 at |logp| ~ 200)
            assert float(reward[j]) == pytest.approx(row[f"reward_{side}"], abs=1e-4), (i, side)
            assert float(logp[j]) == pytest.approx(row[f"logp_{side}"], abs=1e-4, rel=1e-5), (i, side)

    # the PEFT adapter on the base classifier gives the same rewards
    peft = pytest.importorskip("peft")
    kw = dict(torch_dtype=torch.float32, attn_implementation="eager")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(lora_base), num_labels=1, **kw)
    base.config.pad_token_id = transformers.AutoConfig.from_pretrained(str(out / "reward_model")).pad_token_id
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged_rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "reward_model"), **kw).eval()
    ids = torch.tensor([[2, 50, 60, 70, 80, 1, 0, 0], [2, 90, 91, 92, 93, 94, 95, 1]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
        b = merged_rm(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a).max() > 1e-3
