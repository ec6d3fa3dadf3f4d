"""Sample N candidate responses per prompt from a causal LM or a trained run's policy (LM) head.

  python -m haf_jax.sample --model=M --prompts=FILE --out=FILE [--n=4] [--top_p=0.85] \
      [--temperature_range=0.5,1.2 | --temperature=T] [--top_k=0] [--max_new_tokens=256] \
      [--seed=0] [--template=none|phi2|mistral] [--max_prompt_length=128] [--batch_size=8]

M: a run directory (its best checkpoint, or --step), a Hugging Face directory or a hub id of any
family haf_jax reads. The defaults are the paper's Best-of-N sampler: N = 4, top_p 0.85, each
candidate's temperature drawn from U(0.5, 1.2). --temperature=T fixes it (0 = greedy).

Prompt file: JSON lines, one object per prompt with a string field `prompt` (other fields are
ignored, `id` is carried over). Plain text is not accepted: prompts (HH dialogues, ...) contain
newlines. A prompt is formatted and tokenised exactly as the data layer does for training pairs
(template, BOS, the prompt keeps its end when longer than --max_prompt_length).

Output: JSON lines, one row per prompt in input order: `prompt`, `id` (when given),
`candidates` (texts, without the final EOS and the template's response prefix, i.e. what a
preference file's `chosen` field would hold), `candidate_ids` (generated ids, EOS included when
produced), `temperatures` (per candidate), `stopped` ("eos" | "length" per candidate). The last
stdout line is a JSON summary with the settings used.

Rows are bucketed by prompt length (data.batching.length_buckets), so a run compiles one decode
loop per bucket; --batch_size prompts (x N candidates) go through the model at once.
"""
from __future__ import annotations

import gzip
import json
import pathlib
import sys

import numpy as np
from absl import app, flags, logging

from haf_jax.core import paths
from haf_jax.data.errors import DataError, type_name

PAPER_TEMPERATURE_RANGE = (0.5, 1.2)  # Best-of-N sampling in the paper: T ~ U(0.5, 1.2), top_p 0.85
PAPER_TOP_P = 0.85


def define_sampling_flags() -> dict:
    """The flags `sample` and `bon` share (their own flags they define themselves)."""
    f = flags
    return dict(
        prompts=f.DEFINE_string("prompts", None, "JSON-lines file with a string field `prompt` per line."),
        n=f.DEFINE_integer("n", 4, "Candidates per prompt."),
        temperature=f.DEFINE_float("temperature", None, "Fixed temperature for every candidate (0 = greedy); "
                                                        "overrides --temperature_range."),
        temperature_range=f.DEFINE_string("temperature_range", "0.5,1.2", "LOW,HIGH: each candidate's temperature "
                                                                          "is drawn from U(LOW, HIGH)."),
        top_p=f.DEFINE_float("top_p", PAPER_TOP_P, "Nucleus sampling mass (1.0 = off)."),
        top_k=f.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off)."),
        max_new_tokens=f.DEFINE_integer("max_new_tokens", 256, "Most tokens generated per candidate."),
        seed=f.DEFINE_integer("seed", 0, "Sampling seed (keys and temperatures per prompt and candidate)."),
        template=f.DEFINE_string("template", "none", "Prompt template: none | phi2 | mistral (as in training)."),
        max_prompt_length=f.DEFINE_integer("max_prompt_length", 128, "Prompt tokens kept (the end)."),
        batch_size=f.DEFINE_integer("batch_size", 8, "Prompts per batch (each with N candidate rows)."),
        dtype=f.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the sampler."),
        step=f.DEFINE_string("step", "best", "For run directories: best | last | a step number."),
    )


# ----------------------------------------------------------------------------- input

def _open_text(path: str):
    """Text lines of a local or remote (gs://...) file, gzip-decoded for .gz."""
    if path.endswith(".gz"):
        return gzip.open(paths.path(path).open("rb"), "rt", encoding="utf-8")
    return paths.path(path).open("r", encoding="utf-8")


def read_jsonl(path: str):
    """(line number, object) of each non-blank line; DataError naming the file and line otherwise."""
    if not paths.path(path).is_file():
        raise DataError("no such file", source=path)
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"not valid JSON ({e.msg} at column {e.colno}); expected one JSON "
                                    "object per line", source=path, where=f"line {lineno}") from None
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got a {type_name(row)}", source=path,
                                    where=f"line {lineno}")
                yield lineno, row
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason})", source=path) from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read ({e})", source=path) from None


def text_field(row: dict, key: str, path: str, lineno: int) -> str:
    if key not in row:
        raise DataError("missing", source=path, where=f"line {lineno}", field=key)
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", source=path, where=f"line {lineno}", field=key)
    return value


def read_prompts(path: str) -> list[dict]:
    """[{"prompt": str, "id"?: ...}] of a JSON-lines prompt file, in file order."""
    rows = []
    for lineno, row in read_jsonl(path):
        prompt = text_field(row, "prompt", path, lineno)
        if not prompt.strip():
            raise DataError("empty prompt", source=path, where=f"line {lineno}", field="prompt")
        rows.append({"prompt": prompt, **({"id": row["id"]} if row.get("id") is not None else {})})
    if not rows:
        raise DataError("no prompts (empty file)", source=path)
    return rows


def encode_prompts(tokenizer, prompts: list[str], *, template: str, max_prompt_length: int) -> list[np.ndarray]:
    """int32 token ids of each prompt, by the data layer's contract (tokenize.encode_pairs: BOS,
    no double BOS, cut to max_prompt_length keeping the end) after the training template."""
    from haf_jax.data import TEMPLATES, tokenize

    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    fmt = TEMPLATES[template][0]
    # The prompt's tokens do not depend on the responses under truncation="always": encode with
    # empty ones and keep the prompt part.
    pairs = [{"prompt": fmt.format(x=p), "chosen": "", "rejected": ""} for p in prompts]
    encoded = tokenize.encode_pairs(tokenizer, pairs, max_length=max_prompt_length + 2,
                                    max_prompt_length=max_prompt_length)
    return encoded.prompt


def eos_ids(tokenizer, model_cfg, source: str | None) -> tuple[int, ...]:
    """Ids that end a candidate: the tokenizer's EOS, the model config's, and those of the
    checkpoint's generation_config.json (e.g. an end-of-turn token) when it has one."""
    ids = {int(tokenizer.eos_token_id), int(model_cfg.eos_token_id)}
    gen = pathlib.Path(source or "") / "generation_config.json"
    if source and gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(v) for v in (value if isinstance(value, list) else [value] if value is not None else []))
    return tuple(sorted(ids))


def candidate_temperatures(n_prompts: int, n: int, *, seed: int, temperature: float | None,
                           temperature_range: tuple[float, float]) -> np.ndarray:
    """float32 [n_prompts, n]: the fixed temperature, or draws from U(low, high) seeded by
    (seed, prompt index), so a prompt's temperatures do not depend on the others."""
    if temperature is not None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return np.full((n_prompts, n), temperature, np.float32)
    low, high = temperature_range
    if not 0 < low <= high:
        raise ValueError(f"temperature_range needs 0 < LOW <= HIGH, got {low},{high}")
    return np.stack([np.random.default_rng([seed, i]).uniform(low, high, n) for i in range(n_prompts)]
                    ).astype(np.float32).reshape(n_prompts, n)


def parse_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--temperature_range must be LOW,HIGH, got {text!r}") from None
    return low, high


# ----------------------------------------------------------------------------- sampling

def generate_candidates(params, model_cfg, prompt_ids: list[np.ndarray], temperatures_PxN: np.ndarray, *,
                        settings, seed: int = 0, batch_size: int = 8, max_prompt_length: int | None = None,
                        mesh=None, progress: bool = True):
    """Candidates of every prompt: list (prompt) of list (candidate) of (ids int32 [T_j], eos bool).

    prompt_ids: int32 token ids per prompt (>= 1 each); temperatures_PxN: float32 [P, N];
    settings: sampling.DecodeSettings. Prompts are sorted by length and cut into batches of
    `batch_size` prompts; each batch is padded to a full batch (filler rows generate nothing) and
    to a length bucket, `length_buckets(max_prompt_length)` from 16 up (the longest prompt when
    None), so the jitted loop compiles once per bucket, whatever the prompts of the file. Candidate j of prompt i
    draws with the key fold_in(fold_in(key(seed), i), j). With `mesh`, rows are split over its
    data x fsdp axes when they divide them.
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from haf_jax.core import sharding
    from haf_jax.data.batching import bucket_for, length_buckets
    from haf_jax.generation import decode as sampling

    n_prompts, n = temperatures_PxN.shape
    if n < 1:
        raise ValueError(f"need at least one candidate per prompt, got n={n}")
    lengths = np.array([len(p) for p in prompt_ids])
    if n_prompts != len(prompt_ids) or (lengths < 1).any():
        raise ValueError("every prompt needs >= 1 token and one row of temperatures")
    buckets = length_buckets(max(16, max_prompt_length or 0, int(lengths.max())), min_bucket=16)
    base = jax.random.key(seed)
    row_keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))
    order = np.argsort(lengths, kind="stable")
    rows = batch_size * n
    row_sharding = None
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        row_sharding = (lambda nd: sharding.batch_sharding(mesh, nd)) if rows % shards == 0 else None
    out: list = [None] * n_prompts
    batches = [order[s:s + batch_size] for s in range(0, n_prompts, batch_size)]
    for members in tqdm(batches, desc="sample", unit="batch", disable=not progress or len(batches) < 2,
                        leave=False):
        width = bucket_for(int(lengths[members].max()), buckets)
        tokens = np.full((rows, width), settings.pad_id, np.int32)
        length = np.ones(rows, np.int32)
        temps = np.zeros(rows, np.float32)
        active = np.zeros(rows, bool)
        prompt_index = np.zeros(rows, np.int32)
        for k, i in enumerate(members):
            block = slice(k * n, (k + 1) * n)
            tokens[block, :lengths[i]] = prompt_ids[i]
            length[block], temps[block], active[block], prompt_index[block] = lengths[i], temperatures_PxN[i], True, i
        keys = row_keys(jnp.asarray(prompt_index), jnp.tile(jnp.arange(n, dtype=jnp.int32), batch_size))
        args = (tokens, length, temps, keys, active)
        if row_sharding is not None:
            args = tuple(jax.device_put(a, row_sharding(a.ndim)) for a in args)
        new, n_new, eos = jax.device_get(sampling.generate(params, *args, config=model_cfg, settings=settings))
        for k, i in enumerate(members):
            out[i] = [(new[k * n + j, :n_new[k * n + j]].astype(np.int32), bool(eos[k * n + j])) for j in range(n)]
    return out


def candidate_text(tokenizer, ids: np.ndarray, eos: bool, response_prefix: str) -> str:
    """The response text of generated ids: the final EOS dropped, the template's response prefix
    (phi2: a space) removed, so the text is what a preference file's response field holds."""
    text = tokenizer.decode([int(t) for t in (ids[:-1] if eos else ids)], skip_special_tokens=False)
    return text[len(response_prefix):] if response_prefix and text.startswith(response_prefix) else text


def sample(model: str, prompts_path: str, *, n: int = 4, temperature: float | None = None,
           temperature_range: tuple[float, float] = PAPER_TEMPERATURE_RANGE, top_p: float = PAPER_TOP_P,
           top_k: int = 0, max_new_tokens: int = 256, seed: int = 0, template: str = "none",
           max_prompt_length: int = 128, batch_size: int = 8, dtype: str = "float32", step: str = "best",
           mesh=None, progress: bool = True) -> tuple[list[dict], dict]:
    """(output rows, summary) of sampling `n` candidates for every prompt of `prompts_path`."""
    prompts = read_prompts(prompts_path)  # a bad file fails before jax and the model load

    import jax
    import jax.numpy as jnp

    from haf_jax.core import sharding
    from haf_jax.data import TEMPLATES, tokenize
    from haf_jax.evaluation.loading import load_model
    from haf_jax.generation import decode as sampling

    temps = candidate_temperatures(len(prompts), n, seed=seed, temperature=temperature,
                                   temperature_range=temperature_range)
    mesh = mesh or sharding.make_mesh((-1, 1, 1))
    params, model_cfg, tokenizer, info = load_model(model, mesh, which=step)
    params = jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), params)
    settings = sampling.DecodeSettings(max_new_tokens=max_new_tokens, eos_ids=eos_ids(tokenizer, model_cfg, info.get("source")),
                                       pad_id=tokenize.pad_id(tokenizer), top_k=top_k, top_p=top_p)
    ids = encode_prompts(tokenizer, [p["prompt"] for p in prompts], template=template,
                         max_prompt_length=max_prompt_length)
    longest = max(len(x) for x in ids) + max_new_tokens
    if longest > model_cfg.max_position_embeddings:
        print(f"warning: prompts + max_new_tokens reach {longest} positions, beyond the model's "
              f"max_position_embeddings={model_cfg.max_position_embeddings}", file=sys.stderr)
    generated = generate_candidates(params, model_cfg, ids, temps, settings=settings, seed=seed,
                                    batch_size=min(batch_size, len(ids)), max_prompt_length=max_prompt_length,
                                    mesh=mesh, progress=progress)
    prefix = TEMPLATES[template][1]
    rows = []
    for p, cands, t in zip(prompts, generated, temps):
        rows.append({**p, "candidates": [candidate_text(tokenizer, c, e, prefix) for c, e in cands],
                     "candidate_ids": [c.tolist() for c, _ in cands], "temperatures": [float(x) for x in t],
                     "stopped": ["eos" if e else "length" for _, e in cands]})
    summary = {"prompts": len(rows), "n": n, "model": info.get("source"), "step": info.get("step"),
               "temperature": temperature, "temperature_range": None if temperature is not None else list(temperature_range),
               "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "template": template,
               "max_prompt_length": max_prompt_length, "eos_ids": list(settings.eos_ids), "dtype": dtype,
               "stopped_at_eos": sum(s == "eos" for r in rows for s in r["stopped"])}
    return rows, summary


def write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON object per line at `path` (local or remote), written whole."""
    target = paths.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def sampling_kwargs(fl: dict) -> dict:
    """Keyword arguments of `sample` from the shared flags."""
    return dict(n=fl["n"].value, temperature=fl["temperature"].value,
                temperature_range=parse_range(fl["temperature_range"].value), top_p=fl["top_p"].value,
                top_k=fl["top_k"].value, max_new_tokens=fl["max_new_tokens"].value, seed=fl["seed"].value,
                template=fl["template"].value, max_prompt_length=fl["max_prompt_length"].value,
                batch_size=fl["batch_size"].value, dtype=fl["dtype"].value, step=fl["step"].value)


def run_cli(body) -> None:
    """Runs body() -> summary; prints it as the last stdout line, or a one-line error and exit 2."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    try:
        summary = body()
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary))


if __name__ == "__main__":
    _FLAGS = define_sampling_flags()
    _MODEL = flags.DEFINE_string("model", None, "Run directory, Hugging Face directory or hub id to sample from.")
    _OUT = flags.DEFINE_string("out", None, "Output JSON-lines file, one row per prompt.")

    def main(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        for flag in (_MODEL, _FLAGS["prompts"], _OUT):
            if not flag.value:
                raise app.UsageError(f"--{flag.name} is required")

        def body():
            rows, summary = sample(_MODEL.value, _FLAGS["prompts"].value, **sampling_kwargs(_FLAGS))
            write_jsonl(_OUT.value, rows)
            return {**summary, "out": _OUT.value}

        run_cli(body)

    app.run(main)
