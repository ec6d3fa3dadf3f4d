"""`PairOptions`: how `load_pairs` reads, splits, checks, tokenises and shards a source.

One frozen value instead of a score of keywords, checked when it is made (a bad value raises
`DataError` naming the option), so training and evaluation can build one, vary a field with
`dataclasses.replace` (the eval split's subsample, say) and hand the same thing to every load::

    opts = PairOptions(max_length=1024, max_prompt_length=256, template="phi2", degenerate="keep")
    train = load_pairs(spec, tok, opts, split="train")
    evals = load_pairs(spec, tok, dataclasses.replace(opts, subsample=1000), split="eval")

The defaults are this project's behaviour; dataset.py says what each option does to the split,
tokenize.py the truncation rules, formats.py the record forms and degenerate pairs, batching.py the
batch order. Values are kept as given (an int eval_fraction stays an int): they enter the dataset
fingerprint, which must not change for the inputs it was made from before.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
from collections.abc import Mapping, Sequence

from haf_jax.data import batching, formats, tokenize
from haf_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class PairOptions:
    """Every setting of `load_pairs` except the source and the split.

    Tokens: max_length (prompt + response tokens per side), max_prompt_length, template (a
    `formats.TEMPLATES` name, string record forms only), keep_eos, truncation ("always" | "trl").
    Records: fields (canonical field name -> the dataset's name, formats.py), degenerate
    ("skip" | "keep"), max_skip_fraction (more skipped pairs than this fraction of the split is an
    error). Split: eval_fraction and seed (the eval carve of split="train"/"eval"), subsample and
    subsample_seed (keep N source rows of the split; 0 keeps all). Batches: batching
    ("length_grouped" | "random": a PairLoader's default), buckets (padded lengths; None: the
    default ladder up to max_length). Hosts: process_index / process_count (which pairs this
    process tokenises). cache_dir: where tokenised slices are kept between runs (None: nowhere).
    """

    max_length: int = 512
    max_prompt_length: int = 128
    template: str = "none"
    keep_eos: bool = True
    truncation: str = "always"
    fields: Mapping[str, str] | None = None  # stored read-only
    degenerate: str = "skip"
    max_skip_fraction: float = 0.1
    eval_fraction: float = 0.05
    seed: int = 0
    subsample: int = 0
    subsample_seed: int = 0
    batching: str = "length_grouped"
    buckets: Sequence[int] | None = None  # stored as a tuple
    process_index: int = 0
    process_count: int = 1
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length", "seed", "subsample_seed", "process_index", "process_count"):
            _integer(name, getattr(self, name))
        _integer("subsample", self.subsample, "a non-negative integer")
        if self.subsample < 0:
            raise DataError(f"subsample must be a non-negative integer, got {self.subsample!r}")
        _choice("template", self.template, tuple(formats.TEMPLATES))
        _choice("truncation", self.truncation, tokenize.TRUNCATIONS)
        _choice("degenerate", self.degenerate, formats.DEGENERATE)
        _choice("batching", self.batching, batching.BATCHING)
        if not isinstance(self.keep_eos, bool):
            raise DataError(f"keep_eos must be true or false, got {self.keep_eos!r}")
        if not 0 <= self.process_index < self.process_count:
            raise DataError(f"bad process_index={self.process_index} for process_count={self.process_count}")
        if not _number(self.eval_fraction) or not 0 <= self.eval_fraction < 1:
            raise DataError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if not _number(self.max_skip_fraction) or self.max_skip_fraction < 0:
            raise DataError(f"max_skip_fraction must be a number >= 0, got {self.max_skip_fraction!r}")
        if self.fields is not None:
            if not isinstance(self.fields, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items()
            ):
                raise DataError(f"fields must map field names to field names (strings), got {self.fields!r}")
            object.__setattr__(self, "fields", types.MappingProxyType(dict(self.fields)))
        if self.buckets is not None:
            if isinstance(self.buckets, (str, bytes)) or not all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in self.buckets
            ):
                raise DataError(f"buckets must be positive integers, got {self.buckets!r}")
            object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise DataError(f"cache_dir must be a path, got {self.cache_dir!r}")

    def fields_dict(self) -> dict | None:
        """`fields` as a plain dict (None when unset), as record conversion and the fingerprint take it."""
        return None if self.fields is None else dict(self.fields)


def _integer(name: str, value, what: str = "an integer") -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise DataError(f"{name} must be {what}, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _choice(name: str, value, known: tuple) -> None:
    if value not in known:
        raise DataError(f"unknown {name} {value!r}; known: {', '.join(known)}")
