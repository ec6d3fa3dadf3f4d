"""The planner: the configured train step compiled ahead of time for a topology (a TPU slice through
libtpu's topology description, or N host CPU devices), its memory per chip against the chip's HBM.
What `python -m haf_jax.plan` prints; nothing is read or loaded (abstract arrays only).

Per chip, from `compiled.memory_analysis()`:
  total = arguments (params + optimizer state + batch) + temporaries + outputs - aliased
(the state is donated, so its outputs alias its arguments and are counted once).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

from haf_jax.training import fit

GiB = fit.GiB
# HBM per chip (public Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}):
# v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB.
HBM_PER_CHIP = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
# Slice shapes by chip count: v5e/v6e are 2-D tori, v4/v5p 3-D.
SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
ACCEPTED = (
    "accepted topologies: JAX names v5e:2x4, v6e:4x4, v4:2x2x1, v5p:2x2x2 (generation:shape); "
    "gcloud accelerator types v5litepod-N / v5e-N / v6e-N (N chips: 4, 8, 16, 32, 64, 128, 256), "
    "v4-N / v5p-N (N TensorCores, 2 per chip: N = 8, 16, 32, ...); cpu:N (N host devices)"
)


class PlanError(ValueError):
    """A clear one-line error (exit 2)."""


def parse_topology(text: str) -> tuple[str, str, int]:
    """(generation, JAX topology name, chips); generation 'cpu' with name 'cpu:N'."""
    t = (text or "").strip().lower()
    m = re.fullmatch(r"cpu:(\d+)", t)
    if m and int(m.group(1)) > 0:
        return "cpu", t, int(m.group(1))
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", t)
    if m:
        gen, shape = m.groups()
        dims = [int(d) for d in shape.split("x")]
        if len(dims) == (3 if gen in ("v4", "v5p") else 2) and all(dims):
            return gen, t, math.prod(dims)
    m = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p)-(\d+)", t)
    if m:
        gen, n = ("v5e" if m.group(1) == "v5litepod" else m.group(1)), int(m.group(2))
        chips, table = (n // 2, SHAPES_3D) if gen in ("v4", "v5p") else (n, SHAPES_2D)
        if (gen not in ("v4", "v5p") or n % 2 == 0) and chips in table:
            return gen, f"{gen}:{table[chips]}", chips
    raise PlanError(f"unknown topology {text!r}; {ACCEPTED}")


def topology_devices(gen: str, name: str, chips: int):
    import jax

    if gen == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < chips:
            raise PlanError(
                f"{name} needs {chips} CPU devices, this process has {len(devices)}: run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={chips}"
            )
        return devices[:chips]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server outside Google Cloud
    # libtpu locks /tmp/libtpu_lockfile per process; compiling needs no chip, so several may share it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    try:
        # v4's default description has a device per TensorCore; JAX runs v4 (like v5p) as one
        # "megacore" device per chip, and only such meshes can be built.
        extra = {"chip_config_name": "megacore"} if gen == "v4" else {}
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices
    except Exception as e:
        raise PlanError(f"topology {name!r} rejected by libtpu: {str(e).splitlines()[0]}; {ACCEPTED}") from None
    if len(devices) % chips:
        raise PlanError(f"topology {name!r} has {len(devices)} devices, expected a multiple of {chips} chips")
    return devices


def hbm_per_chip(gen: str, chips: int) -> int:
    if gen == "cpu":  # the machine's RAM, shared by the N host devices
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // chips
    return HBM_PER_CHIP[gen]


def plan(config, topology: str) -> dict:
    """Compile the configured train step for `topology`; the report as a dict (printed by main)."""
    gen, name, chips = parse_topology(topology)
    devices = topology_devices(gen, name, chips)

    import jax
    import jax.numpy as jnp

    from haf_jax.core import params as params_lib, sharding
    from haf_jax.core.model_setup import model_source, optimizer_for, step_config
    from haf_jax.data import packing
    from haf_jax.training import step as step_lib

    model_cfg, _ = model_source(config)
    try:
        mesh = sharding.make_mesh(tuple(config.mesh.shape), devices=devices)
    except ValueError as e:
        raise PlanError(f"{e} (topology {name})") from None
    mesh_shape = [int(mesh.shape[a]) for a in sharding.MESH_AXES]
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    b, length, accum = config.train.batch_size, config.data.max_length, config.optim.grad_accum
    if b % (n_shards * accum):
        raise PlanError(
            f"train.batch_size={b} must be a multiple of the data-parallel size {n_shards} "
            f"(mesh {dict(mesh.shape)}) times optim.grad_accum={accum}"
        )
    step_cfg = step_config(config, model_cfg)
    optimizer = optimizer_for(config)
    live = config.loss.reference == "live"
    _, abstract_state = step_lib.state_layout(model_cfg, optimizer, mesh, step_cfg.lora)
    param_sh = params_lib.param_shardings(model_cfg, mesh)
    fn, keys = step_lib.jit_train_step(
        step_cfg, optimizer, mesh, jax.tree.map(lambda x: x.sharding, abstract_state), param_sh, live_reference=live
    )
    d = config.data
    pack_shape = packing.largest_shape(
        b,
        length,
        packing=d.packing,
        share_prompt=d.share_prompt,
        pack_length=d.pack_length,
        pack_rows=d.pack_rows,
        row_multiple=n_shards * accum,
    )  # None: plain [B, 2, L] batches
    batch, ref, frozen = fit.abstract_step_args(
        config, step_cfg, model_cfg, mesh, keys, live=live, pack_shape=pack_shape
    )
    sizes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    hbm = hbm_per_chip(gen, chips)
    # v4's topology description has one device per TensorCore (2 per chip): its memory analysis is
    # per core, a chip holds `per_chip` of them.
    per_chip = len(devices) // chips
    report = {
        "topology": name,
        "requested": topology,
        "chips": chips,
        "devices": len(devices),
        "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)),
        "device_kind": devices[0].device_kind,
        "hbm_per_chip_bytes": hbm,
        "objective": step_cfg.loss.objective,
        "compute_dtype": str(jnp.dtype(step_cfg.compute_dtype)),
        "remat": bool(model_cfg.remat),
        "scan_layers": bool(model_cfg.scan_layers),
        "moment_dtype": str(config.optim.moment_dtype),
        "lora_rank": int(config.model.lora.rank),
        "batch": [b, 2, length] if pack_shape is None else [pack_shape.rows, pack_shape.length],
        "grad_accum": accum,
        "state_bytes_total": sizes(abstract_state),
        "frozen_bytes_total": sizes(frozen) + sizes(ref),
    }
    _, result = fit.measure(fn, (abstract_state, batch, ref, frozen), memory_bytes=hbm, per_chip=per_chip)
    report.update(result)
    # XLA's cost analysis counts a loop body once: the LM-head chunks, and with scanned layers one
    # period of layers instead of all of them. The figure is then a lower bound, and says so.
    report["flops_counts_loop_bodies_once"] = True
    report["advice"] = fit.advice(config, mesh_shape, chips, report["fits"], report.get("headroom", 0.0))
    return report


def format_report(r: dict) -> str:
    """`plan`'s report as lines for a person: the setup, memory per chip, FLOPs, verdict, advice."""
    g = lambda n: "?" if n is None else f"{n / GiB:.3f} GiB"
    bpc = r["bytes_per_chip"]
    flops = "?" if r["flops_per_step"] is None else f"{r['flops_per_step']:.3e}"
    lines = [
        f"{r['requested']} -> {r['topology']}: {r['chips']} chips ({r['devices']} devices) of "
        f"{r['device_kind']}, mesh {r['mesh']}, "
        f"{r['objective']} {r['compute_dtype']} remat={r['remat']} scan_layers={r['scan_layers']} "
        f"moment_dtype={r['moment_dtype']} lora_rank={r['lora_rank']}, "
        f"batch {r['batch']} grad_accum={r['grad_accum']}",
        f"state in total: {g(r['state_bytes_total'])} (+ frozen/reference {g(r['frozen_bytes_total'])})",
        f"per chip: arguments {g(bpc['arguments'])}, temporaries {g(bpc['temporaries'])}, "
        f"outputs {g(bpc['outputs'])} (aliased {g(bpc['aliased'])}); total {g(bpc['total'])} "
        f"of {g(r['hbm_per_chip_bytes'])}",
        f"flops per step per chip: {flops} (XLA's count, each loop body once: a lower bound"
        f"{', one period of the scanned layers' if r['scan_layers'] else ''}); compile {r['compile_s']} s",
    ]
    if r["fits"]:
        lines.append(f"verdict: fits with {100 * r['headroom']:.0f}% headroom")
    else:
        lines.append("verdict: does not fit" + (f" ({r['xla_error']})" if r.get("xla_error") else ""))
    lines += [f"advice: {a}" for a in r["advice"]]
    return "\n".join(lines)


def prepare_backend(argv: list[str]) -> None:
    """Before any backend starts: `cpu:N` gets N host devices; nothing runs on a local accelerator
    (TPU topologies compile through libtpu's topology description)."""
    import jax

    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), "")
    m = re.fullmatch(r"cpu:(\d+)", value.strip().lower())
    if m and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={m.group(1)}"
        ).strip()
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
