"""End-to-end HaF runs on the non-Gemma families, each from a real Hugging Face checkpoint directory.

For Llama, Qwen2 and Phi a tiny random `transformers` model (the family's features on, the bundled
2,048-token tokenizer saved beside it) is written with save_pretrained(safe_serialization=True).
Everything runs in this process, on one CPU device (the `one_device` fixture): one run per checkpoint
(haf_jax.training.loop.train on configs/<family>.py with --config.model.checkpoint=DIR) trains 6 steps
of 4 pairs on a 32-row slice of the bundled sample (24 train / 8 eval pairs, max_length 64); then the
libraries of `haf_jax.export` and `haf_jax.score` (evaluation.export.export, evaluation.scoring.score)
run on it and transformers scores the export exactly as `score` scores the run.
The real aidreams260K llama2.c model (../shared/data) is converted to a HF Llama, decoded greedily by
haf_jax's own forward against the ids in ../shared/data/README.md, and trained for a few steps with its
own 512-token tokenizer. (test_family_configs_load_by_path moved to tests/unit/test_family_configs.py.)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.aidreams import readme_greedy_ids
from helpers.runs import score_rows, train_in_process, train_rows, transformers_scores

STEPS = 6
SMALL = [
    f"--config.train.steps={STEPS}",
    "--config.train.batch_size=4",
    "--config.data.max_length=64",
    "--config.data.max_prompt_length=32",
    f"--config.train.eval_every={STEPS}",
    f"--config.checkpoint.every_steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_batch_size=8",
    "--config.data.eval_fraction=0.25",
]
LN2 = math.log(2)
CONFIGS = {"llama": "configs/llama.py", "qwen2": "configs/qwen2.py", "phi": "configs/phi.py"}


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(config, workdir, checkpoint, data):
    """One in-process run of `config` from `checkpoint`; returns its train rows (step -> row)."""
    train_in_process(
        workdir, f"--config.data.train={data}", f"--config.model.checkpoint={checkpoint}", *SMALL, config=config
    )
    return train_rows(workdir)


def check_losses(rows):
    """Step 1 is the initial model: zero reward head (BT loss ln 2) and policy == the precomputed
    reference (DPO loss ln 2). Every logged number is finite; the run got to its last step."""
    assert sorted(rows) == list(range(1, STEPS + 1))
    first = rows[1]
    assert abs(first["reward_loss"] - LN2) <= 1e-6, first
    assert abs(first["policy_loss"] - LN2) <= 1e-6, first
    assert first["reward_chosen"] == first["reward_rejected"] == 0.0
    for step, row in rows.items():
        for key, value in row.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (step, key, value)
    # the weights moved: the reward head reads non-zero rewards, the policy left the reference
    last = rows[STEPS]
    assert last["reward_chosen"] != 0.0 and last["implicit_margin"] != 0.0, last


# ----------------------------------------------------------------------------- tiny checkpoints

_IDS = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)  # the bundled tokenizer's <bos> <eos> <pad>
_SHAPE = dict(vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


def hf_config(family):
    """The family's features at toy size, written as transformers configs (not from haf_jax's presets)."""
    import transformers

    if family == "llama":  # GQA, llama3 rope frequency bands, untied LM head
        return transformers.LlamaConfig(
            **_SHAPE,
            **_IDS,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            max_position_embeddings=131_072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=False,
        )
    if family == "qwen2":  # q/k/v biases, GQA, tied LM head
        return transformers.Qwen2Config(
            **_SHAPE,
            **_IDS,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if family == "phi":  # LayerNorm, parallel block, partial rotary 0.4, biases, untied biased LM head
        return transformers.PhiConfig(
            **_SHAPE,
            **_IDS,
            num_key_value_heads=4,
            partial_rotary_factor=0.4,
            hidden_act="gelu_new",
            layer_norm_eps=1e-5,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            qk_layernorm=False,
        )
    raise ValueError(family)


def build_checkpoint(family, out):
    """A random <Family>ForCausalLM saved as safetensors plus the bundled tokenizer. Every tensor is
    redrawn (biases too, norms around 1) so no weight is a default 0 or 1 a wrong mapping could hide."""
    import torch
    import transformers

    from haf_jax import data

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if (p.ndim == 1 and "norm" in name) else 0.05 * noise)
    model.save_pretrained(out, safe_serialization=True)
    data.load_tokenizer(str(data.sample_paths()["tokenizer"])).save_pretrained(out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    return out


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi"])
def test_haf_from_checkpoint_export_and_score(family, data32, one_device, tmp_path):
    """Train from a tiny <family> checkpoint; export; transformers scores the export like `score`
    scores the run (rewards within 1e-4, log-probs within 1e-4 + 5e-6 relative)."""
    pytest.importorskip("torch")  # the tiny checkpoint is built with transformers
    from safetensors.numpy import load_file

    from haf_jax.evaluation.export import export
    from haf_jax.evaluation.scoring import score
    from haf_jax.model.config import ModelConfig
    from haf_jax.model.families import preset

    ckpt = build_checkpoint(family, tmp_path / "ckpt")
    run = tmp_path / "run"
    rows = train(CONFIGS[family], run, ckpt, data32)
    check_losses(rows)
    # the transformers config reads back as exactly this family's tiny preset
    assert ModelConfig.from_dict(json.loads((run / "model_config.json").read_text())) == preset(f"tiny-{family}")

    out, scores = tmp_path / "export", tmp_path / "scores.jsonl"
    pairs = tmp_path / "pairs8.jsonl"
    pairs.write_text("".join(data32.read_text().splitlines(keepends=True)[:8]))
    exported = export(str(run), str(out))  # what `haf_jax.export` and `haf_jax.score` print last
    summary = score(str(run), str(pairs), str(scores), max_length=64, max_prompt_length=32, batch_size=4)
    assert exported["step"] == STEPS and summary["pairs"] == 8

    # the parameters changed (k_proj biases get no gradient: softmax ignores a per-query constant)
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "policy" / "model.safetensors")
    assert sorted(before) == sorted(after)
    unchanged = [k for k in before if np.array_equal(before[k], after[k])]
    assert all(k.endswith("k_proj.bias") for k in unchanged), unchanged
    assert all(np.isfinite(v).all() for v in after.values())

    ours = score_rows(scores)
    got = transformers_scores(out, pairs, max_length=64, max_prompt_length=32)
    assert sorted(got) == [r["row"] for r in ours] == list(range(8))
    worst = {"reward": 0.0, "logp": 0.0}
    for row in ours:
        reward, logp = got[row["row"]]
        for j, side in enumerate(("chosen", "rejected")):
            # 10x the unit parity tolerances (test_model_hf.py: measured <= 2.2e-6 / 2.0e-5 at |logp| ~ 200)
            assert float(reward[j]) == pytest.approx(row[f"reward_{side}"], abs=1e-4), (row, side)
            assert float(logp[j]) == pytest.approx(row[f"logp_{side}"], abs=1e-4, rel=5e-6), (row, side)
            worst["reward"] = max(worst["reward"], abs(float(reward[j]) - row[f"reward_{side}"]))
            worst["logp"] = max(worst["logp"], abs(float(logp[j]) - row[f"logp_{side}"]))
    assert max(abs(r["reward_chosen"]) + abs(r["reward_rejected"]) for r in ours) > 1e-2  # not a trivial 0 == 0
    print(
        f"{family}: step-1 reward_loss={rows[1]['reward_loss']!r} policy_loss={rows[1]['policy_loss']!r}; "
        f"export vs score max |diff| reward={worst['reward']:.2e} logp={worst['logp']:.2e}"
    )


def test_aidreams_greedy_and_haf(shared_data, data32, one_device, tmp_path):
    """The real tiny Llama (llama2.c aidreams260K -> HF Llama): haf_jax's own forward, whole-prefix
    and with the KV cache, decodes greedily from BOS to the README's ids; HaF trains from it."""
    import jax
    import jax.numpy as jnp

    from haf_jax.model import heads, hf, layers, llama2c

    src = shared_data / "aidreams260K"
    if not (src / "aidreams260K.bin").is_file() or not (src / "tok512.bin").is_file():
        pytest.skip(f"aidreams260K model/tokenizer not found in {src}")
    expected = readme_greedy_ids(shared_data)
    ckpt = llama2c.to_hf_llama(src / "aidreams260K.bin", src / "tok512.bin", tmp_path / "aidreams")
    cfg, _ = hf.load_hf_config(ckpt)
    params, info = hf.load_params(ckpt, cfg)
    assert cfg.family == "llama" and cfg.vocab_size == 512 and info["reward_head"] == "zero-initialised"
    n = len(expected)

    # whole prefix: one fixed [1, n] buffer, causal, so position t's logits see ids[:t + 1] only
    logits_fn = jax.jit(lambda p, t: heads.full_logits(p, cfg, t, jnp.array([n - 1])))
    ids = np.zeros((1, n), np.int32)
    ids[0, 0] = expected[0]
    for t in range(n - 1):
        ids[0, t + 1] = int(np.argmax(np.asarray(logits_fn(params, ids))[0, t]))
    assert ids[0].tolist() == expected

    # KV cache: BOS, then one token at a time
    decode_fn = jax.jit(lambda p, tok, pos, cache: heads.decode(p, cfg, tok, pos, cache))
    cache = layers.init_cache(cfg, 1, n)
    cached = [expected[0]]
    for t in range(n - 1):
        logits, cache = decode_fn(params, jnp.array([[cached[-1]]], jnp.int32), jnp.array([[t]], jnp.int32), cache)
        cached.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert cached == expected

    # HaF from the converted checkpoint with its own tokenizer (512 tokens, BOS 1, EOS 2)
    rows = train(CONFIGS["llama"], tmp_path / "run", ckpt, data32)
    check_losses(rows)
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert (saved["vocab_size"], saved["num_layers"], saved["bos_token_id"], saved["eos_token_id"]) == (512, 4, 1, 2)
    print(f"aidreams: step-1 reward_loss={rows[1]['reward_loss']!r} policy_loss={rows[1]['policy_loss']!r}")
