"""`python -m haf_jax.plan`: the configured train step compiled ahead of time for a topology, its
memory per chip against the chip's HBM. Three compiles: cpu:8 (tiny), v5e:2x4 (a small Gemma from a
local config.json) and one that cannot fit a v5e chip; the topology parser needs none."""

import json
import pathlib

import pytest
from helpers.commands import command

from haf_jax.training import planning

ROOT = pathlib.Path(__file__).resolve().parents[2]
GEMMA = f"--config={ROOT / 'configs' / 'gemma.py'}"
KEYS = ("fits", "topology", "chips", "mesh", "hbm_per_chip_bytes", "bytes_per_chip", "flops_per_step", "compile_s")


def _run(capsys, *args) -> tuple[dict, str]:
    command("haf_jax.plan").invoke(["plan", GEMMA, *args])
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert all(k in report for k in KEYS), report
    assert all(k in report["bytes_per_chip"] for k in ("arguments", "temporaries", "total"))
    return report, "\n".join(out[:-1])


def test_topology_names_map_to_jax_topologies():
    assert planning.parse_topology("v5litepod-8") == ("v5e", "v5e:2x4", 8)
    assert planning.parse_topology("v5e-16") == ("v5e", "v5e:4x4", 16)
    assert planning.parse_topology("v6e-8") == ("v6e", "v6e:2x4", 8)
    assert planning.parse_topology("v4-32") == ("v4", "v4:2x2x4", 16)  # 32 TensorCores = 16 chips
    assert planning.parse_topology("v5p-64") == ("v5p", "v5p:2x4x4", 32)
    assert planning.parse_topology("v5p:2x2x2") == ("v5p", "v5p:2x2x2", 8)
    assert planning.parse_topology("cpu:8") == ("cpu", "cpu:8", 8)
    for bad in ("v9-8", "v5e:2x2x2", "v4-7", "v5e-3", "tpu", ""):
        with pytest.raises(planning.PlanError, match="accepted topologies"):
            planning.parse_topology(bad)


def test_unknown_topology_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        command("haf_jax.plan").invoke(["plan", GEMMA, "--topology=v9-8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown topology 'v9-8'") and "Traceback" not in err


def test_tiny_on_cpu_8_fits(capsys):
    report, text = _run(capsys, "--topology=cpu:8")
    assert report["fits"] is True and report["chips"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["flops_per_step"] > 0 and report["bytes_per_chip"]["total"] > 0
    assert "verdict: fits with" in text


def test_state_is_sharded_over_v5e_2x4(capsys, tmp_path):
    """A 2-layer Gemma (vocabulary 16384, width 256) from a local config.json: no weights, no data.
    Each chip's arguments are ~1/8 of the train state (FSDP over 8 chips)."""
    pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU topologies")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["GemmaForCausalLM"],
                "model_type": "gemma",
                "vocab_size": 16384,
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 128,
                "hidden_act": "gelu_pytorch_tanh",
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0,
                "bos_token_id": 2,
                "eos_token_id": 1,
                "pad_token_id": 0,
                "tie_word_embeddings": True,
            }
        )
    )
    report, _ = _run(
        capsys, "--topology=v5litepod-8", f"--config.model.checkpoint={tmp_path}", "--config.data.max_length=128"
    )
    assert report["topology"] == "v5e:2x4" and report["chips"] == 8 and report["fits"] is True
    assert report["hbm_per_chip_bytes"] == 16 * 2**30
    state = report["state_bytes_total"]
    assert state / 8 <= report["bytes_per_chip"]["arguments"] < 1.1 * state / 8


def test_what_cannot_fit_says_so_with_advice(capsys):
    """131072 pairs x 2 x 256 tokens: the activations need far more than a v5e chip's 16 GiB.
    XLA refuses to compile (RESOURCE_EXHAUSTED); that is the verdict, with its number."""
    pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU topologies")
    report, text = _run(capsys, "--topology=v5e:2x4", "--config.train.batch_size=131072")
    assert report["fits"] is False
    assert report["bytes_per_chip"]["total"] > 16 * 2**30
    assert "RESOURCE_EXHAUSTED" in report["xla_error"]
    assert any("grad_accum" in a for a in report["advice"]) and any("remat" in a for a in report["advice"])
    assert "verdict: does not fit" in text


def test_train_stops_before_step_1_when_the_step_cannot_fit(monkeypatch, tmp_path, load_config):
    """haf_jax.train compiles its step for the largest batch first; on devices too small (here an
    injected 1 MiB per device) it stops with the planner's verdict and advice, before any weight
    or reference pass, instead of an XLA out-of-memory traceback."""
    from haf_jax.training import fit, loop

    config = load_config("configs/gemma.py")
    config.train.batch_size = 8
    measured = []
    real_measure = fit.measure
    monkeypatch.setattr(
        fit, "measure", lambda *a, **k: measured.append(real_measure(*a, **k)[1]) or (None, measured[-1])
    )
    monkeypatch.setattr(fit, "device_memory_bytes", lambda devices: 2**20)
    monkeypatch.setattr(loop, "initial_params", lambda *a: pytest.fail("weights loaded before the fit check"))
    with pytest.raises(fit.DoesNotFit) as e:
        loop.train(config, tmp_path / "run")
    need = measured[0]["bytes_per_chip"]["total"]
    assert 2**20 < need < 2**30  # the tiny step's real size, above the injected figure
    message = str(e.value)
    assert message.startswith(f"the train step does not fit: it needs {need / 2**20:.1f} MiB per device of 1.0 MiB")
    assert (
        "batch tokens 8 x 2 x 256" in message and "advice: rematerialise blocks: --config.model.remat=True" in message
    )
    assert not (tmp_path / "run" / "reference_train.npy").exists()


@pytest.mark.parametrize("layout, rows", [("packing", [8, 1024]), ("share_prompt", [16, 512])])
def test_packed_and_shared_prompt_steps_are_planned_at_their_largest_batch(capsys, layout, rows):
    """Packed rows and shared-prompt rows are planned at the largest batch their loader can make
    (the planner reads no data): 16 pairs of at most 2 x 256 tokens in rows of 4 x 256 -> 8 rows;
    shared prompts: 16 rows of 2 x 256."""
    report, _ = _run(capsys, "--topology=cpu:8", f"--config.data.{layout}=True")
    assert report["fits"] is True and report["batch"] == rows
