"""Candidate responses sampled from a causal LM or a trained run's policy (LM) head: the library of
`python -m haf_jax.sample` (and of `bon`, which scores them).

Prompt files are JSON lines with a string field `prompt` (`id` carried over); a prompt is formatted
and tokenised exactly as the data layer does for training pairs (template, BOS, the prompt keeps
its end). Each output row holds the prompt, `candidates` (texts, without the final EOS and the
template's response prefix), `candidate_ids`, `temperatures` and `stopped` ("eos" | "length").
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from haf_jax.data import jsonl
from haf_jax.data.errors import DataError, type_name

PAPER_TEMPERATURE_RANGE = (0.5, 1.2)  # Best-of-N sampling in the paper: T ~ U(0.5, 1.2), top_p 0.85
PAPER_TOP_P = 0.85


# ----------------------------------------------------------------------------- input


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
    for lineno, row in jsonl.read(path):
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
    encoded = tokenize.encode_pairs(
        tokenizer, pairs, max_length=max_prompt_length + 2, max_prompt_length=max_prompt_length
    )
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


def candidate_temperatures(
    n_prompts: int, n: int, *, seed: int, temperature: float | None, temperature_range: tuple[float, float]
) -> np.ndarray:
    """float32 [n_prompts, n]: the fixed temperature, or draws from U(low, high) seeded by
    (seed, prompt index), so a prompt's temperatures do not depend on the others."""
    if temperature is not None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return np.full((n_prompts, n), temperature, np.float32)
    low, high = temperature_range
    if not 0 < low <= high:
        raise ValueError(f"temperature_range needs 0 < LOW <= HIGH, got {low},{high}")
    return (
        np.stack([np.random.default_rng([seed, i]).uniform(low, high, n) for i in range(n_prompts)])
        .astype(np.float32)
        .reshape(n_prompts, n)
    )


# ----------------------------------------------------------------------------- sampling


def generate_candidates(
    params,
    model_cfg,
    prompt_ids: list[np.ndarray],
    temperatures: np.ndarray,
    *,
    settings,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    mesh=None,
    progress: bool = True,
    prompt_index: np.ndarray | None = None,
    first_candidate: int = 0,
):
    """Candidates of every prompt: list (prompt) of list (candidate) of (ids int32 [T_j], eos bool).

    prompt_ids: int32 token ids per prompt (>= 1 each); temperatures: float32 [prompts, n];
    settings: sampling.DecodeSettings. Prompts are sorted by length and cut into batches of
    `batch_size` prompts; each batch is padded to a full batch (filler rows generate nothing) and
    to a length bucket, `length_buckets(max_prompt_length)` from 16 up (the longest prompt when
    None), so the jitted loop compiles once per bucket, whatever the prompts of the file. Candidate j of prompt i
    draws with the key fold_in(fold_in(key(seed), i), j), where i is `prompt_index[k]` for the k-th
    prompt given (default k) and j counts from `first_candidate`: a later round of draws for some
    prompts (the distinct-candidate rule) continues each prompt's stream. With `mesh`, rows are
    split over its data x fsdp axes when they divide them.
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from haf_jax.core import sharding
    from haf_jax.data.batching import bucket_for, length_buckets
    from haf_jax.generation import decode as sampling

    n_prompts, n = temperatures.shape
    if n < 1:
        raise ValueError(f"need at least one candidate per prompt, got n={n}")
    lengths = np.array([len(p) for p in prompt_ids])
    if n_prompts != len(prompt_ids) or (lengths < 1).any():
        raise ValueError("every prompt needs >= 1 token and one row of temperatures")
    buckets = length_buckets(max(16, max_prompt_length or 0, int(lengths.max())), min_bucket=16)
    base = jax.random.key(seed)
    row_keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))
    index = np.arange(n_prompts) if prompt_index is None else np.asarray(prompt_index)
    order = np.argsort(lengths, kind="stable")
    rows = batch_size * n
    row_sharding = None
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        row_sharding = (lambda nd: sharding.batch_sharding(mesh, nd)) if rows % shards == 0 else None
    out: list = [None] * n_prompts
    batches = [order[s : s + batch_size] for s in range(0, n_prompts, batch_size)]
    for members in tqdm(batches, desc="sample", unit="batch", disable=not progress or len(batches) < 2, leave=False):
        width = bucket_for(int(lengths[members].max()), buckets)
        tokens = np.full((rows, width), settings.pad_id, np.int32)
        length = np.ones(rows, np.int32)
        temps = np.zeros(rows, np.float32)
        active = np.zeros(rows, bool)
        row_prompt = np.zeros(rows, np.int32)
        for k, i in enumerate(members):
            block = slice(k * n, (k + 1) * n)
            tokens[block, : lengths[i]] = prompt_ids[i]
            length[block], temps[block], active[block], row_prompt[block] = lengths[i], temperatures[i], True, index[i]
        columns = jnp.tile(jnp.arange(first_candidate, first_candidate + n, dtype=jnp.int32), batch_size)
        keys = row_keys(jnp.asarray(row_prompt), columns)
        args = (tokens, length, temps, keys, active)
        if row_sharding is not None:
            args = tuple(jax.device_put(a, row_sharding(a.ndim)) for a in args)
        new, n_new, eos = jax.device_get(sampling.generate(params, *args, config=model_cfg, settings=settings))
        for k, i in enumerate(members):
            out[i] = [(new[k * n + j, : n_new[k * n + j]].astype(np.int32), bool(eos[k * n + j])) for j in range(n)]
    return out


def distinct_indices(texts: list[str], n: int) -> list[int]:
    """Indices of the first n texts (in draw order) distinct from every earlier one, compared with
    surrounding whitespace stripped (the authors strip their decoded samples before comparing)."""
    seen, keep = set(), []
    for j, text in enumerate(texts):
        if len(keep) == n:
            break
        if text.strip() not in seen:
            seen.add(text.strip())
            keep.append(j)
    return keep


def draws_needed(texts: list[str], n: int) -> int:
    """Draws a one-at-a-time loop over `texts` makes before it holds n distinct ones (all when it
    never does)."""
    keep = distinct_indices(texts, n)
    return keep[-1] + 1 if len(keep) == n else len(texts)


def candidate_text(tokenizer, ids: np.ndarray, eos: bool, response_prefix: str) -> str:
    """The response text of generated ids: the final EOS dropped, the template's response prefix
    (phi2: a space) removed, so the text is what a preference file's response field holds."""
    text = tokenizer.decode([int(t) for t in (ids[:-1] if eos else ids)], skip_special_tokens=False)
    return text[len(response_prefix) :] if response_prefix and text.startswith(response_prefix) else text


def sample(
    model: str,
    prompts_path: str,
    *,
    n: int = 4,
    temperature: float | None = None,
    temperature_range: tuple[float, float] = PAPER_TEMPERATURE_RANGE,
    top_p: float = PAPER_TOP_P,
    top_k: int = 0,
    max_new_tokens: int = 256,
    seed: int = 0,
    template: str = "none",
    max_prompt_length: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    step: str = "best",
    mesh=None,
    progress: bool = True,
    distinct: bool = False,
) -> tuple[list[dict], dict]:
    """(output rows, summary) of sampling `n` candidates for every prompt of `prompts_path`.

    distinct: the paper's Best-of-N rule (the authors' `sample_n_topk`): draw until n candidates
    with distinct texts (compared without surrounding whitespace), at most 2n draws; a row then also
    holds `draws` (how many a one-at-a-time loop makes: up to the n-th distinct text, or 2n) and
    `short_of_n: true` when fewer than n distinct texts came out of 2n draws (it keeps those). Draws
    run batched in two rounds: n per prompt, then n more for the prompts that drew a repeat.

    The model is loaded float32 (loading.load_model) and cast whole to `dtype`; the summary holds
    the settings used, the model's source and step, and how many candidates stopped at an EOS."""
    prompts = read_prompts(prompts_path)  # a bad file fails before jax and the model load

    import jax
    import jax.numpy as jnp

    from haf_jax.core import sharding
    from haf_jax.core.logs import log
    from haf_jax.data import TEMPLATES, tokenize
    from haf_jax.evaluation.loading import load_model
    from haf_jax.generation import decode as sampling

    # 2n columns with the distinct rule: a prompt's first n temperatures are the same either way
    # (one seeded stream per prompt), so the rule only adds draws, it changes none.
    temps = candidate_temperatures(
        len(prompts), 2 * n if distinct else n, seed=seed, temperature=temperature, temperature_range=temperature_range
    )
    mesh = mesh or sharding.make_mesh((-1, 1, 1))
    m = load_model(model, mesh, which=step, float32=True)
    model_cfg, tokenizer = m.model_cfg, m.tokenizer
    params = jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), m.params)  # the heads too: the sampler's dtype
    settings = sampling.DecodeSettings(
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids(tokenizer, model_cfg, m.source),
        pad_id=tokenize.pad_id(tokenizer),
        top_k=top_k,
        top_p=top_p,
    )
    ids = encode_prompts(
        tokenizer, [p["prompt"] for p in prompts], template=template, max_prompt_length=max_prompt_length
    )
    longest = max(len(x) for x in ids) + max_new_tokens
    if longest > model_cfg.max_position_embeddings:
        log(
            f"warning: prompts + max_new_tokens reach {longest} positions, beyond the model's "
            f"max_position_embeddings={model_cfg.max_position_embeddings}"
        )
    draw = functools.partial(
        generate_candidates,
        params,
        model_cfg,
        settings=settings,
        seed=seed,
        max_prompt_length=max_prompt_length,
        mesh=mesh,
        progress=progress,
    )
    prefix = TEMPLATES[template][1]

    def texts(cands):
        return [candidate_text(tokenizer, c, e, prefix) for c, e in cands]

    rows_per_batch = min(batch_size, len(ids))  # both rounds: one batch shape, no second compile
    generated = draw(ids, temps[:, :n], batch_size=rows_per_batch)
    drawn = [texts(c) for c in generated]
    if distinct:
        # Second round, only for the prompts with a repeat among their first n: candidates n..2n-1,
        # each prompt's own stream continued (keys and temperatures), as a one-at-a-time loop would go on.
        again = [i for i, t in enumerate(drawn) if len(distinct_indices(t, n)) < n]
        if again:
            more = draw(
                [ids[i] for i in again],
                temps[again, n:],
                batch_size=rows_per_batch,
                prompt_index=np.asarray(again),
                first_candidate=n,
            )
            for i, cands in zip(again, more):
                generated[i] = generated[i] + cands
                drawn[i] = drawn[i] + texts(cands)
    rows = []
    for p, cands, t, words in zip(prompts, generated, temps, drawn):
        keep = distinct_indices(words, n) if distinct else list(range(n))
        row = {
            **p,
            "candidates": [words[j] for j in keep],
            "candidate_ids": [cands[j][0].tolist() for j in keep],
            "temperatures": [float(t[j]) for j in keep],
            "stopped": ["eos" if cands[j][1] else "length" for j in keep],
        }
        if distinct:
            row["draws"] = draws_needed(words, n)
            if len(keep) < n:
                row["short_of_n"] = True
        rows.append(row)
    summary = {
        "prompts": len(rows),
        "n": n,
        "model": m.source,
        "step": m.step,
        "temperature": temperature,
        "temperature_range": None if temperature is not None else list(temperature_range),
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "template": template,
        "max_prompt_length": max_prompt_length,
        "eos_ids": list(settings.eos_ids),
        "dtype": dtype,
        "stopped_at_eos": sum(s == "eos" for r in rows for s in r["stopped"]),
        "distinct": distinct,
    }
    if distinct:
        summary.update(draws=sum(r["draws"] for r in rows), short_of_n=sum(bool(r.get("short_of_n")) for r in rows))
    return rows, summary
