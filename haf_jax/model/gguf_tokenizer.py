"""The tokenizer a GGUF file's metadata describes, as a `transformers.PreTrainedTokenizerFast`.

llama.cpp stores the vocabulary in `tokenizer.ggml.*` keys: `model` ("gpt2": byte-level BPE, as
GPT-2, Llama 3, Qwen2, SmolLM; "llama": SentencePiece BPE with byte fallback, as Llama 2, Mistral,
Gemma), `tokens` [V] (the pieces, id order), `token_type` [V] (1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte), `merges` (gpt2: "left right" strings, rank order), `scores`
(llama: one float per piece, a higher score merges first), `pre` (gpt2: the name of the
pre-tokenizer llama.cpp hard-codes for that model family), the special ids (`bos_token_id`,
`eos_token_id`, `unknown_token_id`, `padding_token_id`), `add_bos_token` / `add_eos_token` /
`add_space_prefix`, and `tokenizer.chat_template`.

The GGUF keeps only the name of the pre-tokenizer, so the regexes are spelled out here for the
names we know (each as its model's own tokenizer.json has it); any other name is refused.
"""

from __future__ import annotations

from typing import Any

CONTROL, USER_DEFINED, BYTE = 3, 4, 6
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3 and Qwen2 differ in the digit run: up to 3 digits a word, or one.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# pre name -> (split digits one by one first, the word-split regex)
BPE_PRE = {
    "default": (False, _GPT2_SPLIT),
    "gpt-2": (False, _GPT2_SPLIT),
    "phi-2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


def _byte_level(meta: dict[str, Any], where: str):
    """A byte-level BPE `tokenizers.Tokenizer` (model "gpt2")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BPE_PRE:
        raise ValueError(
            f"{where}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer haf_jax does not know; known: {sorted(BPE_PRE)}"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{where}: a gpt2 (byte-level BPE) tokenizer without tokenizer.ggml.merges")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    digits, split = BPE_PRE[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict[str, Any], types: list[int], where: str):
    """A SentencePiece-BPE `tokenizers.Tokenizer` with byte fallback (model "llama")."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{where}: a llama (SentencePiece) tokenizer needs one tokenizer.ggml.scores entry a token")
    merges = sentencepiece_merges(tokens, scores, [t in (1, USER_DEFINED) for t in types])
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # As Llama 2's tokenizer.json: a normalizer (not a Metaspace pre-tokenizer, which would skip the
    # prefix when the text already starts with a space) and no word splitting.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(content=" ", left=1, right=0)] * prefix
    )
    return tok


def sentencepiece_merges(pieces: list[str], scores, mergeable: list[bool]) -> list[tuple[str, str]]:
    """Merges for `tokenizers`' BPE reproducing SentencePiece BPE: every split of a mergeable piece into
    two mergeable pieces, ranked by the merged piece's score (highest first; ties by piece id, then
    by split position). `pieces` [V], `scores` [V], `mergeable` [V] bool."""
    ids = {p: i for i, p in enumerate(pieces) if mergeable[i]}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            if piece[:k] in ids and piece[k:] in ids:
                ranked.append((-float(scores[i]), i, k, piece[:k], piece[k:]))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _special_name(tokens: list[str], meta: dict, key: str, where: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    if i is None:
        return None
    if not 0 <= int(i) < len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.{key}_token_id={i} is outside the vocabulary of {len(tokens)}")
    return tokens[int(i)]


def build_tokenizer(meta: dict[str, Any], where: str = "GGUF"):
    """`transformers.PreTrainedTokenizerFast` from GGUF metadata (plain Python values; see module
    docstring). Raises ValueError naming `where` and the key for what it cannot build."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{where}: no tokenizer.ggml.tokens: the file carries no tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level(meta, where)
    elif kind == "llama":
        tok = _sentencepiece(meta, types, where)
    else:
        raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (gpt2 or llama)")
    # Control tokens (<|im_start|>, <bos>, ...) are never split and are skipped when decoding with
    # skip_special_tokens; user-defined ones are never split but decode as text.
    added = [
        AddedToken(t, special=types[i] == CONTROL, normalized=False)
        for i, t in enumerate(tokens)
        if types[i] in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    names = {k: _special_name(tokens, meta, k, where) for k in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and names["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and names["eos"] is not None
    single = [f"{names['bos']}:0"] * add_bos + ["$A:0"] + [f"{names['eos']}:0"] * add_eos
    pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
    specials = [(names[k], tokens.index(names[k])) for k in ("bos", "eos") if (k == "bos" and add_bos) or add_eos]
    post = [processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)]
    if kind == "gpt2":
        post.insert(0, processors.ByteLevel(trim_offsets=False))
    tok.post_processor = processors.Sequence(post)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names["bos"],
        eos_token=names["eos"],
        unk_token=names["unknown"],
        pad_token=names["padding"],
        clean_up_tokenization_spaces=False,
    )
    if meta.get("tokenizer.chat_template"):
        fast.chat_template = meta["tokenizer.chat_template"]
    return fast
