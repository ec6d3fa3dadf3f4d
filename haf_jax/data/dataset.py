"""`load_pairs`: source -> rows -> explicit pairs -> split -> tokens, with a report and fingerprint.

    ds = load_pairs("pairs.jsonl", tok, PairOptions(max_length=1024), split="train")
    ds = load_pairs(Records("candidates", rows), tok, PairOptions(eval_fraction=0), split="all")

The source is a spec (string or config block, formats.py / sources.py) or rows already in memory
(`sources.Records`); every other setting is a field of `PairOptions` (options.py).

Fingerprint: sha256 of the rows as read (each row's JSON, keys sorted), the tokenizer's
fingerprint and the settings that change the pairs or their tokens (not the file name or records name: the same
rows are the same data wherever they come from); the reference cache and the token cache are keyed
by it.

Splits (``split=``):
- ``"all"``: every pair of the source.
- ``"train"`` / ``"eval"``: recipes with a fixed rule (alpaca_human_pref: first 10% of the kept
  rows are eval; chatbot_arena: first 5%) use it. Otherwise ``eval_fraction`` of the source rows
  is carved out for eval by a permutation seeded with ``seed`` (exact count
  ``max(1, round(eval_fraction * rows))``); ``eval_fraction=0`` makes "train" = "all".
  Carving is by source row, so the pairs a ranking expands to stay on one side.
- ``options.subsample=N`` (> 0) then keeps N source rows of the split, those that Hugging Face
  `datasets` would pick with ``split.shuffle(seed=subsample_seed).select(range(N))`` (both use
  ``np.random.default_rng(seed).permutation``); the pairs stay in source order. Rows counted are
  those the recipe filters keep (degenerate ones included), e.g. the paper's BeaverTails eval:
  exactly-one-safe rows, shuffled with seed 0, 1000 of them. N >= the row count keeps them all.

Fidelity options (`PairOptions` fields, config keys data.truncation / data.degenerate /
data.batching; the defaults are this project's behaviour, the alternatives the paper authors'):
``truncation`` "always" | "trl" (tokenize.py), ``degenerate`` "skip" | "keep" (formats.py),
``batching`` "length_grouped" | "random" (batching.py; stored on the dataset as the default of a
`PairLoader` over it). Options left at their defaults do not enter the fingerprint, so caches made
before they existed stay valid.

Multi-host: every process reads and converts all rows (cheap; identical indices, skip counts and
errors everywhere) but tokenises only the pairs it owns (``index % process_count ==
process_index``); pair lengths and truncation flags are then all-gathered (a few int32 per pair)
so every process knows the global batch shapes and the report is global (so `load_pairs` is a
collective call then: every process must make it, with the same arguments). When
``options.process_count > 1`` but `jax.distributed` is not initialised (a simulation in one process),
all pairs are tokenised locally instead and only the slice is served.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np

from haf_jax.data import batching as batching_lib, formats, sources, tokenize
from haf_jax.data.errors import DataError
from haf_jax.data.options import PairOptions

SPLITS = ("train", "eval", "all")
REPORT_VERSION = 1


@dataclasses.dataclass
class PairDataset:
    """Tokenised pairs of one split (see module docstring for sharding).

    pairs: list of N dicts {prompt, chosen, rejected, chat, id?} (text, all processes);
    tokens: `tokenize.TokenizedPairs` of the owned pairs; local_indices: int64 [n_local];
    all_lengths: int32 [N, 2] token lengths (prompt + response) of chosen/rejected of ALL pairs;
    prompt_lengths: int32 [N] their prompts' token lengths (a shared-prompt row's size needs both);
    all_raw_lengths: int32 [N, 2] the same as all_lengths before truncation (a pair was cut where
    they differ).
    """

    pairs: list
    tokens: tokenize.TokenizedPairs
    local_indices: np.ndarray
    all_lengths: np.ndarray
    pad_id: int
    max_length: int
    buckets: list
    process_index: int
    process_count: int
    report: dict
    fingerprint: str
    groups: list = dataclasses.field(default_factory=list)  # [N] source row (group) of each pair
    skipped: list = dataclasses.field(default_factory=list)  # (source row, reason) of skipped pairs
    batching: str = "length_grouped"  # how a PairLoader over this split batches by default (batching.py)
    prompt_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    all_raw_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), np.int32))

    def __len__(self) -> int:
        return len(self.pairs)

    def local_position(self, index: int) -> int:
        if index % self.process_count != self.process_index:
            raise IndexError(f"pair {index} belongs to process {index % self.process_count}")
        return index // self.process_count

    def batches(self, batch_size: int):
        """ONE in-order pass over the split in global batches of `batch_size` pairs; the last is
        filled up with filler pairs (valid=False, index=-1). Yields process-local batches."""
        return batching_lib.in_order_batches(self, batch_size)


def load_pairs(source, tokenizer, options: PairOptions | None = None, *, split: str = "train") -> PairDataset:
    """Read, convert, split and tokenise preference pairs.

    source: a spec (string or config block; grammar in formats.py/sources.py) or `sources.Records`
    (rows in memory). options: `PairOptions` (None: all defaults). split: "train" | "eval" | "all".
    Raises `DataError` on bad input, bad settings, or when more than ``options.max_skip_fraction``
    of the split's pairs are skipped (empty/identical responses unless ``degenerate="keep"``,
    mismatched prompts). With ``options.cache_dir``, the tokenised slice is stored there under the
    fingerprint and reused by the next run (rows are still read and checked; only tokenisation is
    skipped). Options and splits: module docstring.
    """
    o = PairOptions() if options is None else options
    if not isinstance(o, PairOptions):
        raise DataError(f"options must be a PairOptions, got {type(o).__name__}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    recipe, source = _resolve(source)
    raw_hash = hashlib.sha256()

    def hashed_rows():
        for where, row in sources.read_rows(source):
            raw_hash.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
            raw_hash.update(b"\n")
            yield where, row

    conv = formats.convert_rows(
        hashed_rows(),
        source=source.label,
        recipe=recipe,
        template=o.template,
        fields=o.fields_dict(),
        tokenizer=tokenizer,
        degenerate=o.degenerate,
    )
    in_split = _split_groups(conv.groups, split, recipe, o.eval_fraction, o.seed, source.label)
    if o.subsample:
        in_split = _subsample(in_split, o.subsample, o.subsample_seed)
    pairs = [p for p in conv.pairs if in_split[p["group"]]]
    skipped = collections.Counter(r for g, r in conv.skipped if in_split[g])
    kept = collections.Counter(r for g, r in conv.kept if in_split[g])
    total = len(pairs) + sum(skipped.values())
    if total == 0:
        raise DataError(
            f"no pairs in split {split!r} (rows read: {conv.rows_read}, filtered: {dict(conv.filtered)})",
            source=source.label,
        )
    skip_frac = sum(skipped.values()) / total
    if skip_frac > o.max_skip_fraction:
        raise DataError(
            f"{skip_frac:.1%} of the pairs would be skipped ({dict(skipped)}), more than "
            f"max_skip_fraction={o.max_skip_fraction:.1%}; fix the data or raise the limit",
            source=source.label,
        )
    if not pairs:
        raise DataError(f"every pair of split {split!r} was skipped ({dict(skipped)})", source=source.label)

    n = len(pairs)
    settings = dict(
        recipe=recipe,
        source=source.label,
        split=split,
        max_length=o.max_length,
        max_prompt_length=o.max_prompt_length,
        template=o.template,
        fields=o.fields_dict(),
        eval_fraction=o.eval_fraction if split != "all" else None,
        seed=o.seed if split != "all" else None,
        keep_eos=o.keep_eos,
    )
    # Options that change the pairs or their tokens; at their defaults they are left out of the
    # fingerprint, which thus stays what it was before they existed (reference caches stay valid).
    late = dict(
        truncation=o.truncation,
        degenerate=o.degenerate,
        subsample=o.subsample,
        subsample_seed=o.subsample_seed if o.subsample else None,
    )
    defaults = dict(truncation="always", degenerate="skip", subsample=0, subsample_seed=None)
    fp = hashlib.sha256()
    fp.update(raw_hash.hexdigest().encode())
    fp.update(tokenize.tokenizer_fingerprint(tokenizer).encode())
    fp.update(
        json.dumps(
            {
                **{k: v for k, v in settings.items() if k != "source"},
                **{k: v for k, v in late.items() if v != defaults[k]},
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    fingerprint = fp.hexdigest()[:32]
    settings.update(late, batching=o.batching)

    p, n_proc = o.process_index, o.process_count
    distributed = n_proc > 1 and _jax_process_count() == n_proc
    local_indices = np.arange(p, n, n_proc, dtype=np.int64)
    enc_kw = dict(
        max_length=o.max_length, max_prompt_length=o.max_prompt_length, keep_eos=o.keep_eos, truncation=o.truncation
    )
    cache_file = os.path.join(o.cache_dir, f"pairs-{fingerprint}-{p}of{n_proc}.npz") if o.cache_dir else None
    cached = _load_cache(cache_file, len(local_indices))
    if cached is not None:
        tokens, lengths, raw, flags, prompt_lengths = cached
    elif n_proc == 1 or distributed:
        tokens = tokenize.encode_pairs(tokenizer, [pairs[i] for i in local_indices], **enc_kw)
        lengths, raw, flags, prompt_lengths = _gather(tokens, n, p, n_proc, distributed)
    else:  # simulation in one process: tokenise all, keep the slice
        full = tokenize.encode_pairs(tokenizer, pairs, **enc_kw)
        lengths, raw, flags, prompt_lengths = full.lengths, full.raw_lengths, full.flags, _prompt_lengths(full)
        tokens = tokenize.TokenizedPairs(
            *[[getattr(full, f)[i] for i in local_indices] for f in ("prompt", "chosen", "rejected")],
            full.lengths[local_indices],
            full.raw_lengths[local_indices],
            full.flags[local_indices],
        )
    if cache_file and cached is None:
        _save_cache(cache_file, tokens, lengths, raw, flags, prompt_lengths)

    report = dict(
        version=REPORT_VERSION,
        **settings,
        rows_read=conv.rows_read,
        filtered_by_reason=dict(sorted(conv.filtered.items())),
        pairs=n,
        skipped_by_reason=dict(sorted(skipped.items())),
        skipped_fraction=round(skip_frac, 6),
        degenerate_kept_by_reason=dict(sorted(kept.items())),
        truncated_prompt=int(((flags & tokenize.PROMPT_CUT) > 0).sum()),
        truncated_response=int(((flags & tokenize.RESPONSE_CUT) > 0).sum()),
        lost_eos=int(((flags & tokenize.LOST_EOS) > 0).sum()),
        tokens_raw=_percentiles(raw),
        tokens=_percentiles(lengths),
        tokenizer=getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        fingerprint=fingerprint,
        process_count=n_proc,
    )
    return PairDataset(
        pairs=[{k: v for k, v in pair.items() if k != "group"} for pair in pairs],
        tokens=tokens,
        local_indices=local_indices,
        all_lengths=lengths,
        pad_id=tokenize.pad_id(tokenizer),
        max_length=o.max_length,
        buckets=list(o.buckets or batching_lib.length_buckets(o.max_length)),
        process_index=p,
        process_count=n_proc,
        report=report,
        fingerprint=fingerprint,
        groups=[pair["group"] for pair in pairs],
        skipped=[(g, r) for g, r in conv.skipped if in_split[g]],
        batching=o.batching,
        prompt_lengths=prompt_lengths,
        all_raw_lengths=raw,
    )


def _resolve(source) -> tuple[str | None, sources.Source | sources.Records]:
    """(recipe name or None, the source to read) of a spec or in-memory `Records`."""
    if isinstance(source, sources.Records):
        if source.recipe is not None:
            formats.check_recipe(source.recipe)
        return source.recipe, source
    recipe, spec = formats.parse_spec(source)
    return recipe, sources.parse_source(spec)


def _split_groups(n_groups, split, recipe, eval_fraction, seed, label) -> np.ndarray:
    """bool [n_groups]: which source rows (kept by the recipe filters) belong to `split`."""
    keep = np.ones(n_groups, bool)
    if split == "all" or n_groups == 0:
        return keep
    first = formats.RECIPES[recipe].first_eval_fraction if recipe else None
    is_eval = np.zeros(n_groups, bool)
    if first is not None:
        is_eval[: int(n_groups * first)] = True
    elif eval_fraction > 0:
        n_eval = max(1, int(round(eval_fraction * n_groups)))
        is_eval[np.random.default_rng(seed).permutation(n_groups)[:n_eval]] = True
    elif split == "eval":
        raise DataError("split='eval' with eval_fraction=0: nothing to carve; give an eval file", source=label)
    return is_eval if split == "eval" else ~is_eval


def _subsample(in_split: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The n rows of the split that `datasets`' ``shuffle(seed=seed).select(range(n))`` picks."""
    rows = np.flatnonzero(in_split)
    if n >= len(rows):
        return in_split
    out = np.zeros_like(in_split)
    out[rows[np.random.default_rng(seed).permutation(len(rows))[:n]]] = True
    return out


def _jax_process_count() -> int:
    import jax

    return jax.process_count()


def _prompt_lengths(tokens) -> np.ndarray:
    return np.array([len(p) for p in tokens.prompt], np.int32)


def _gather(tokens, n, p, n_proc, distributed):
    """Global (lengths [n,2], raw_lengths [n,2], flags [n], prompt lengths [n]) from every process's
    owned pairs."""
    if not distributed:
        return tokens.lengths, tokens.raw_lengths, tokens.flags, _prompt_lengths(tokens)
    from haf_jax.core import distributed

    per = -(-n // n_proc)
    local = np.zeros((per, 6), np.int32)
    m = len(tokens.flags)
    local[:m, 0:2], local[:m, 2:4], local[:m, 4] = tokens.lengths, tokens.raw_lengths, tokens.flags
    local[:m, 5] = _prompt_lengths(tokens)
    allv = distributed.stack_hosts(local)  # [P, per, 6]
    out = np.zeros((n, 6), np.int32)
    for q in range(n_proc):
        out[q::n_proc] = allv[q, : len(range(q, n, n_proc))]
    return out[:, 0:2], out[:, 2:4], out[:, 4].astype(np.uint8), out[:, 5]


def _save_cache(path, tokens, lengths, raw, flags, prompt_lengths):
    """Write the tokenised slice + global arrays atomically (ragged lists stored flat)."""
    arrays = {
        "lengths": lengths,
        "raw": raw,
        "flags": flags,
        "prompt_lengths": prompt_lengths,
        "local_lengths": tokens.lengths,
        "local_raw": tokens.raw_lengths,
        "local_flags": tokens.flags,
    }
    for f in ("prompt", "chosen", "rejected"):
        parts = getattr(tokens, f)
        arrays[f] = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        arrays[f + "_len"] = np.array([len(x) for x in parts], np.int64)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def _load_cache(path, n_local):
    if not path or not os.path.exists(path):
        return None
    try:
        z = np.load(path)
        ragged = [
            np.split(z[f], np.cumsum(z[f + "_len"])[:-1]) if len(z[f + "_len"]) else []
            for f in ("prompt", "chosen", "rejected")
        ]
        if len(ragged[0]) != n_local:
            return None
        tokens = tokenize.TokenizedPairs(*ragged, z["local_lengths"], z["local_raw"], z["local_flags"])
        return tokens, z["lengths"], z["raw"], z["flags"], z["prompt_lengths"]
    except (OSError, ValueError, KeyError):  # unreadable (or older) cache: just tokenise again
        return None


def _percentiles(lengths: np.ndarray) -> dict:
    x = lengths.max(axis=1) if len(lengths) else np.zeros(1)
    q = np.percentile(x, [50, 90, 95, 99])
    return {"p50": int(q[0]), "p90": int(q[1]), "p95": int(q[2]), "p99": int(q[3]), "max": int(x.max())}


def format_report(report: dict) -> str:
    """Human-readable multi-line data report."""
    r = report
    lines = [
        f"data: {r['source']}"
        + (f" (recipe {r['recipe']})" if r.get("recipe") else "")
        + f", split {r['split']}, template {r['template']}, tokenizer {r['tokenizer']}",
        f"  rows read {r['rows_read']}, pairs {r['pairs']}, fingerprint {r['fingerprint']}",
        f"  filtered by recipe: {_counts(r['filtered_by_reason'])}",
        f"  skipped: {_counts(r['skipped_by_reason'])} ({r['skipped_fraction']:.2%} of the split)",
    ]
    if r.get("degenerate") == "keep":
        lines.append(f"  degenerate pairs kept (data.degenerate=keep): {_counts(r['degenerate_kept_by_reason'])}")
    if r.get("subsample"):
        lines.append(f"  subsample: {r['subsample']} source rows (shuffle seed {r['subsample_seed']})")
    lines += [
        f"  truncated: prompt {r['truncated_prompt']}, response {r['truncated_response']}, "
        f"lost EOS {r['lost_eos']} (rule {r.get('truncation', 'always')}, max_length {r['max_length']}, "
        f"max_prompt_length {r['max_prompt_length']})",
        "  tokens per pair (longer side) before truncation: " + _pct(r["tokens_raw"]),
        "  tokens per pair (longer side) after truncation:  " + _pct(r["tokens"]),
    ]
    return "\n".join(lines)


def _counts(d):
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _pct(d):
    return ", ".join(f"{k} {v}" for k, v in d.items())
