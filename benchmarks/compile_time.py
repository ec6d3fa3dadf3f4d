"""Compile time of the train step with scanned vs unrolled layers, measured in one run.

  python benchmarks/compile_time.py [--preset=gemma-2b] [--topology=v5litepod-8] [--batch=16] [--length=512]
      [--config=configs/llama.py]

Both steps are the real HaF train step as `haf_jax.plan` builds it (configs/gemma.py's paper-scale
setup: bf16 compute, remat, FSDP over all chips, 16 pairs x 2 x 512 tokens), compiled ahead of
time for the TPU topology through libtpu (no TPU needed: `pip install -e '.[tpu]'`); only
model.scan_layers differs. Prints each compile time, the per-chip memory of both and the ratio
unrolled / scanned. The machine may be shared and noisy: the ratio is what to compare, and the
two compiles run back to back in this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: pathlib.Path, preset: str):
    spec = importlib.util.spec_from_file_location("haf_jax_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "gemma.py"))
    p.add_argument("--preset", default="gemma-2b")
    p.add_argument("--topology", default="v5litepod-8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=512)
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")  # TPU topologies compile through libtpu's description
    from haf_jax.training import planning as plan

    results = {}
    for scan_layers in (True, False):
        config = load_config(pathlib.Path(args.config), args.preset)
        config.model.scan_layers = scan_layers
        config.train.batch_size, config.data.max_length = args.batch, args.length
        report = plan.plan(config, args.topology)
        results["scanned" if scan_layers else "unrolled"] = report
        total = report["bytes_per_chip"]["total"]
        print(
            f"scan_layers={scan_layers}: compile {report['compile_s']:.1f} s, "
            f"{'?' if total is None else f'{total / plan.GiB:.2f} GiB'} per chip, fits={report['fits']}",
            flush=True,
        )
    ratio = results["unrolled"]["compile_s"] / results["scanned"]["compile_s"]
    print(f"{args.preset} on {args.topology}: unrolled / scanned compile time = {ratio:.2f}x")
    summary = {
        "preset": args.preset,
        "topology": args.topology,
        "batch": [args.batch, 2, args.length],
        "compile_s": {k: r["compile_s"] for k, r in results.items()},
        "bytes_per_chip": {k: r["bytes_per_chip"] for k, r in results.items()},
        "ratio": round(ratio, 2),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
