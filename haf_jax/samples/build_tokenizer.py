"""Regenerate haf_jax/samples/tokenizer/: a byte-level BPE (vocab 2048) trained on the bundled sample.

    python -m haf_jax.samples.build_tokenizer [--out DIR] [--check]

Special tokens: <pad>=0, <eos>=1, <bos>=2, <unk>=3. Training reads the sample's chosen and
rejected dialogues in file order, single-threaded (RAYON_NUM_THREADS=1) so the merges are the
same on every machine; --check rebuilds into a temp dir and compares with the shipped files.
The result loads with `transformers.AutoTokenizer.from_pretrained(DIR)` (PreTrainedTokenizerFast).
"""

import argparse
import filecmp
import gzip
import json
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = 2048
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] "
    "+ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def texts(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["chosen"]
            yield row["rejected"]


def build(out: pathlib.Path, data: pathlib.Path) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(data), trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    specials = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "tokenizer"))
    ap.add_argument("--data", default=str(HERE / "hh_harmless_base_test.jsonl.gz"))
    ap.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(pathlib.Path(tmp), pathlib.Path(args.data))
            same = all(filecmp.cmp(os.path.join(tmp, f), os.path.join(args.out, f), shallow=False) for f in FILES)
        print("identical" if same else "DIFFERENT")
        return 0 if same else 1
    build(pathlib.Path(args.out), pathlib.Path(args.data))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
