"""Does the compiled train step fit the devices? The analysis behind `haf_jax.plan` (ahead of time,
for a TPU topology) and behind `haf_jax.train`'s check before step 1 (on the devices it runs on).

Per device, from XLA's `compiled.memory_analysis()`:
  total = arguments (params + optimizer state + batch) + temporaries + outputs - aliased
(the state is donated, so its outputs alias its arguments and are counted once). A compile that
XLA itself refuses for lack of memory (RESOURCE_EXHAUSTED, as XLA:TPU does) is the same verdict.
"""

from __future__ import annotations

import os
import re
import time

import jax
import jax.numpy as jnp

from haf_jax.core import forward, params as params_lib

GiB = 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class DoesNotFit(ValueError):
    """The train step needs more memory than a device has; the message is the verdict and advice."""


def exhausted_bytes(message: str) -> tuple[int | None, int | None]:
    """(needed, available) bytes from XLA's 'Used 21.02G of 15.75G hbm' or '... temporaries
    (185.10G) exceeds available HBM (15.75G)' (None when absent)."""
    m = re.search(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)", message) or re.search(
        r"\(([\d.]+)([KMGT]?)\)\s+exceeds available HBM\s+\(([\d.]+)([KMGT]?)\)", message
    )
    if not m:
        return None, None
    return int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)])


def advice(config, mesh_shape, chips: int, fits: bool, headroom: float) -> list[str]:
    """What to change in the run config when the step does not fit (or fits with < 10% headroom)."""
    if fits and headroom >= 0.1:
        return []
    out = []
    if mesh_shape[1] < chips:
        out.append(
            f'shard the state over more chips: --config.mesh.shape="(1,-1,1)" (FSDP over all {chips})'
            if mesh_shape[0] > 1
            else 'use more FSDP: --config.mesh.shape="(1,-1,1)"'
        )
    if not config.model.remat:
        out.append("rematerialise blocks: --config.model.remat=True")
    out.append(
        f"fewer pairs per micro-batch: --config.optim.grad_accum={2 * config.optim.grad_accum} "
        f"(or a smaller train.batch_size={config.train.batch_size}; also data.max_length={config.data.max_length})"
    )
    if config.model.lora.rank == 0:
        out.append("train adapters only: --config.model.lora.rank=64 (the Adam state then covers just the adapters)")
    if config.model.lora.rank == 0 and config.optim.moment_dtype == "float32":
        out.append(
            "keep Adam's first moment in bfloat16: --config.optim.moment_dtype=bfloat16 (2 bytes less per "
            "trained parameter)"
        )
    if config.model.compute_dtype == "float32":
        out.append("compute in bfloat16: --config.model.compute_dtype=bfloat16")
    out.append("or a bigger slice (more chips, or v5p's 95 GiB per chip)")
    return out


def abstract_step_args(config, step_cfg, model_cfg, mesh, keys, *, live: bool, pack_shape=None):
    """(batch, live reference params or None, LoRA's frozen base or None) as ShapeDtypeStructs with
    the step's shardings; the batch is the largest one: train.batch_size pairs x 2 x data.max_length,
    or, packed, the loader's one static shape (`pack_shape`: data.packing.PackShape, global rows)."""
    if pack_shape is not None:
        b, rows = pack_shape.slots, (pack_shape.rows, pack_shape.length)
        dims = {"tokens": rows, "response_mask": rows, "positions": rows, "segment_ids": rows}
    else:
        b, length = config.train.batch_size, config.data.max_length
        dims = {"tokens": (b, 2, length), "response_mask": (b, 2, length)}
    dims.update({"last_index": (b, 2), "valid": (b,), "ref_logp": (b, 2)})
    dtypes = {"valid": jnp.bool_, "ref_logp": jnp.float32}
    batch_sh = forward.batch_shardings(mesh, keys, packed=pack_shape is not None)
    batch = {k: jax.ShapeDtypeStruct(dims[k], dtypes.get(k, jnp.int32), sharding=batch_sh[k]) for k in keys}
    full = params_lib.abstract_params(model_cfg, mesh)
    ref = full if live and step_cfg.loss.needs_reference else None
    frozen_sh = params_lib.frozen_shardings(model_cfg, step_cfg.lora, mesh)
    frozen = None if frozen_sh is None else {k: full[k] for k in frozen_sh}
    return batch, ref, frozen


def measure(fn, args, *, memory_bytes: int, per_chip: int = 1):
    """(compiled or None, result): `fn` (jitted) compiled for `args` and its memory per chip.

    result: fits, compile_s, flops_per_step, bytes_per_chip {arguments, temporaries, outputs,
    aliased, total}, headroom (fraction of `memory_bytes` left), or xla_error when XLA refused to
    compile for lack of memory. `per_chip` devices make one chip (v4: 2 TensorCores)."""
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed, available = exhausted_bytes(str(e))
        first = next((line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e)[:300])
        result = {
            "fits": False,
            "compile_s": round(time.perf_counter() - t0, 2),
            "flops_per_step": None,
            "bytes_per_chip": {
                "arguments": None,
                "temporaries": None,
                "outputs": None,
                "aliased": None,
                "total": needed and needed * per_chip,
            },
            "xla_error": first.strip()[:500],
        }
        if available:
            result["hbm_usable_per_chip_bytes"] = available * per_chip
        return None, result
    compile_s = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    args_b, temp = per_chip * int(mem.argument_size_in_bytes), per_chip * int(mem.temp_size_in_bytes)
    outs, alias = per_chip * int(mem.output_size_in_bytes), per_chip * int(mem.alias_size_in_bytes)
    total = args_b + temp + outs - alias
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")  # of one device's program (the per-chip share of the step)
    return compiled, {
        "fits": total <= memory_bytes,
        "compile_s": compile_s,
        "flops_per_step": None if flops is None else float(flops) * per_chip,
        "bytes_per_chip": {"arguments": args_b, "temporaries": temp, "outputs": outs, "aliased": alias, "total": total},
        "headroom": round(1 - total / memory_bytes, 4),
    }


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def device_memory_bytes(devices) -> int:
    """Memory of one device: the runtime's limit (TPU, GPU); on CPU the machine's RAM shared by the
    process's devices (as `haf_jax.plan` counts cpu:N)."""
    stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)


def check_train_step(
    config, step_cfg, model_cfg, mesh, train_fn, keys, abstract_state, *, live: bool, pack_shape=None
) -> None:
    """Compiles `train_fn` (the run's jitted train step) for the largest batch before step 1 and
    raises DoesNotFit with the verdict and advice when a device cannot hold it. The compiled step
    stays in `train_fn`'s cache, so the first step of that shape does not compile again."""
    batch, ref, frozen = abstract_step_args(config, step_cfg, model_cfg, mesh, keys, live=live, pack_shape=pack_shape)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    memory = device_memory_bytes(local)
    _, result = measure(train_fn, (abstract_state, batch, ref, frozen), memory_bytes=memory)
    if result["fits"]:
        return
    mesh_shape = [int(mesh.shape[a]) for a in ("data", "fsdp", "tensor")]
    total = result["bytes_per_chip"]["total"]
    need = "?" if total is None else size(total)
    detail = f" ({result['xla_error']})" if result.get("xla_error") else ""
    lines = [
        f"the train step does not fit: it needs {need} per device of {size(memory)} "
        f"({mesh.devices.size} x {local[0].device_kind}, mesh {dict(zip(('data', 'fsdp', 'tensor'), mesh_shape))}, "
        f"batch tokens {' x '.join(map(str, batch['tokens'].shape))}){detail}"
    ]
    lines += [f"advice: {a}" for a in advice(config, mesh_shape, mesh.devices.size, False, 0.0)]
    lines.append("(python -m haf_jax.plan --config=... --topology=... checks a setup without running it)")
    raise DoesNotFit("\n".join(lines))
