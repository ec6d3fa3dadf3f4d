"""Preference data: sources, record forms, tokenisation contract, batches, iterator.

    from haf_jax.data import PairLoader, PairOptions, Records, format_report, load_pairs, load_tokenizer, sample_paths
    tok = load_tokenizer(sample_paths()["tokenizer"])        # or an HF dir / hub id
    ds = load_pairs("sample", tok, split="train")            # carves eval_fraction=0.05 for eval
    print(format_report(ds.report))
    loader = PairLoader(ds, 16, seed=0)                      # infinite, resumable: loader.state
    batch = next(loader)                                     # tokens [B, 2, L], ... (batching.py)
    opts = PairOptions(max_length=256, eval_fraction=0, degenerate="keep")   # every other setting
    ds = load_pairs(Records("candidates", [{"prompt": p, "chosen": a, "rejected": b}]), tok, opts, split="all")

`load_pairs(source, tokenizer, options, split=...)`: `source` is a spec (below) or `Records`
(rows in memory, a name for messages: "candidates record 3, field 'chosen': ..."); `options` a
`PairOptions` (options.py). JSON lines are read and written by `jsonl.read` / `jsonl.write`
(local or gs://, gzip, errors naming file, line and field; atomic writes).

Spec grammar::

    SPEC   := SOURCE | "recipe:" RECIPE [":" SOURCE]
    SOURCE := PATH (.jsonl .jsonl.gz .json .json.gz .parquet .csv) | "sample"
            | "hf:" NAME [":" (CONFIG | "data_dir=" DIR)] ":" SPLIT
            | "tfds:" NAME [":data_dir=" DIR] ":" SPLIT
    RECIPE := hh_helpful | hh_harmless | beavertails_safe | alpaca_human_pref | chatbot_arena

or a dict config block: {"path": P} | {"hf": NAME, "config", "data_dir", "split"} |
{"tfds": NAME, "split", "data_dir"}, each optionally with "recipe": RECIPE.
An hf NAME that is an existing local directory (or starts with / ./ ../ ~) is a dataset
repository on disk in the hub layout (parquet/jsonl shards, data_dir folders, README `configs:`),
read offline. tfds reads prepared array_record datasets through tfds.data_source, without
TensorFlow (extra haf_jax[tfds]), from DIR or $TFDS_DATA_DIR; nothing is downloaded. Hub and TFDS
SPLITs may be sliced: train[:10%]. Details: sources.py.
Record forms and recipes: formats.py. Sources and errors: sources.py. Contract: tokenize.py; the
same contract as a chat template for PyTorch trainers (an export's tokenizer): chat_format.py.

Train/eval wiring for the trainer (config keys data.train / data.eval):
- data.eval == "": train = load_pairs(T, split="train"), eval = load_pairs(T, split="eval") with
  the same eval_fraction and seed (alpaca_human_pref / chatbot_arena use their fixed first-N% rule);
- otherwise: load_pairs(T, split="all") and load_pairs(E, split="all");
- both with ``PairOptions(..., **fidelity_options(config.data))`` (data.truncation / degenerate /
  batching), the eval split also with ``**eval_options(config.data)`` (data.eval_subsample[_seed]);
  haf_jax/core/data_options.py reads those from a run config: this package takes explicit options.
Bad data raises `DataError` (message names the file or dataset and split, line/row, field):
print it and exit 2; `python -m haf_jax.data SPEC` checks a spec that way.
"""

from haf_jax.data.batching import PairLoader, length_buckets
from haf_jax.data.chat_format import chat_template, format_mismatch, with_training_format
from haf_jax.data.dataset import PairDataset, format_report, load_pairs
from haf_jax.data.errors import DataError
from haf_jax.data.formats import RECIPES, TEMPLATES
from haf_jax.data.options import PairOptions
from haf_jax.data.packing import PackedLoader, real_tokens, train_loader
from haf_jax.data.sources import Records
from haf_jax.data.tokenize import load_tokenizer, tokenizer_fingerprint
from haf_jax.samples import sample_paths

__all__ = [
    "DataError",
    "PackedLoader",
    "PairDataset",
    "PairLoader",
    "PairOptions",
    "RECIPES",
    "Records",
    "TEMPLATES",
    "chat_template",
    "format_mismatch",
    "format_report",
    "length_buckets",
    "load_pairs",
    "load_tokenizer",
    "real_tokens",
    "sample_paths",
    "tokenizer_fingerprint",
    "train_loader",
    "with_training_format",
]
