"""Tokenizer loading and the tokenisation contract (DESIGN.md section 3).

One example (prompt p, response y), no chat template::

    prompt ids   = [bos] + tok(p)                      (no BOS when the tokenizer has none)
    response ids = tok(y) + [eos]                      response mask = exactly these
    ids          = prompt ids + response ids           reward read at the last id (the EOS)

``tok`` = the HF tokenizer with ``add_special_tokens=False``. A leading BOS that the text itself
produced (e.g. a chat template writing "<bos>") is dropped, so there is never a double BOS.
Chat-rendered pairs (``chat=True``): p and y are the rendered prompt and assistant turn; y ends
with the template's end-of-turn token, which plays the EOS role (an EOS is appended only when the
rendered turn does not end in a special token).

Truncation (same rule for chosen and rejected, so both keep identical prompt tokens), by
``truncation`` (config key ``data.truncation``):

``"always"`` (default):
1. the prompt (BOS included) is cut to ``max_prompt_length`` keeping its END (the BOS stays first),
   whatever the response lengths;
2. each response gets the remaining ``max_length - len(prompt ids)`` tokens.

``"trl"`` (the paper authors' rule, TRL 0.7's DPO tokenisation with ``truncation_mode="keep_end"``):
1. only when ``len(prompt ids) + len(longer response ids)`` exceeds ``max_length`` is the prompt
   cut to ``max_prompt_length`` keeping its END (BOS first, as above); a long prompt next to short
   responses is kept whole;
2. if that is still too long, both responses are cut to ``max_length - max_prompt_length`` tokens
   (TRL's budget, whatever the prompt's actual length).

In both modes a response that is too long for its budget keeps its first ``budget - 1`` tokens and
its final EOS (``keep_eos=True``, default), so the reward is always read at an EOS (TRL drops the
EOS there: ``keep_eos=False`` does that, and the pair is counted in ``lost_eos``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import tempfile

import numpy as np

from haf_jax.data.errors import DataError

# bits of TokenizedPairs.flags
PROMPT_CUT, RESPONSE_CUT, LOST_EOS = 1, 2, 4
TRUNCATIONS = ("always", "trl")  # data.truncation (module docstring)


def _cache_root() -> str:
    root = os.environ.get("HAF_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "haf_jax"
    )
    return os.path.join(root, "tokenizers")


def _unpack_gz_dir(path: str) -> str:
    """Copy a dir holding tokenizer.json.gz (and maybe *.json.gz configs) to a cache dir with the
    files decompressed; returns that dir. Keyed by the content hash, written atomically."""
    h = hashlib.sha256()
    names = sorted(os.listdir(path))
    for n in names:
        if n.endswith(".json") or n.endswith(".json.gz") or n.endswith(".model"):
            with open(os.path.join(path, n), "rb") as f:
                h.update(n.encode() + b"\0" + f.read())
    out = os.path.join(_cache_root(), h.hexdigest()[:24])
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    os.makedirs(_cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=_cache_root())
    try:
        for n in names:
            src = os.path.join(path, n)
            if n.endswith(".json.gz"):
                try:
                    with gzip.open(src, "rb") as fi, open(os.path.join(tmp, n[:-3]), "wb") as fo:
                        shutil.copyfileobj(fi, fo)
                except (OSError, EOFError) as e:
                    raise DataError(f"broken gzip file ({e})", source=src) from None
            elif n.endswith(".json") or n.endswith(".model"):
                shutil.copy(src, os.path.join(tmp, n))
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(path_or_hub_id: str):
    """AutoTokenizer from a local dir (preferred), a dir holding tokenizer.json.gz, or a hub id.

    Never trusts remote code. A pad id is always available through `pad_id(tok)`.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "tokenizer.json")) and os.path.exists(
            os.path.join(path, "tokenizer.json.gz")
        ):
            path = _unpack_gz_dir(path)
    elif os.path.exists(path):
        raise DataError(
            "expected a tokenizer directory (tokenizer.json or tokenizer.json.gz inside) or a hub id, got a file",
            source=path,
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        where = "local dir" if os.path.isdir(path) else "hub id (needs network or the HF cache)"
        raise DataError(
            f"cannot load tokenizer from {where}: {type(e).__name__}: {e}", source=str(path_or_hub_id)
        ) from None
    tok._haf_file_hash = _tokenizer_file_hash(path)
    if tok.eos_token_id is None:
        raise DataError("tokenizer has no EOS token; the reward is read at the EOS", source=str(path_or_hub_id))
    return tok


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def _tokenizer_file_hash(path: str) -> str | None:
    """sha256 of a local tokenizer.json (fast path for `tokenizer_fingerprint`)."""
    f = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(f):
        return None
    with open(f, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """Hash of everything that changes token ids: vocab/merges/normaliser, specials, template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if getattr(tok, "_haf_file_hash", None):
        h.update(tok._haf_file_hash.encode())
    elif backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tok.get_vocab().items())).encode())
    h.update(
        repr(
            (
                type(tok).__name__,
                tok.bos_token_id,
                tok.eos_token_id,
                tok.pad_token_id,
                getattr(tok, "chat_template", None),
            )
        ).encode()
    )
    return h.hexdigest()


@dataclasses.dataclass
class TokenizedPairs:
    """Ragged token storage for n pairs.

    prompt[i]: int32 [Pi] (BOS + prompt, after truncation); chosen[i], rejected[i]: int32 [Ri]
    (response + EOS, after truncation). lengths: int32 [n, 2] full lengths (prompt + response) of
    chosen/rejected; raw_lengths: int32 [n, 2] the same before truncation; flags: uint8 [n]
    (PROMPT_CUT | RESPONSE_CUT | LOST_EOS).
    """

    prompt: list
    chosen: list
    rejected: list
    lengths: np.ndarray
    raw_lengths: np.ndarray
    flags: np.ndarray


def encode_pairs(
    tok, pairs: list, *, max_length: int, max_prompt_length: int, keep_eos: bool = True, truncation: str = "always"
) -> TokenizedPairs:
    """Tokenise explicit pairs (dicts with prompt/chosen/rejected[/chat]) by the contract;
    `truncation` is "always" or "trl" (module docstring)."""
    if truncation not in TRUNCATIONS:
        raise DataError(f"unknown truncation {truncation!r}; known: {', '.join(TRUNCATIONS)}")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    specials = set(tok.all_special_ids)
    prefix = [bos] if bos is not None else []
    if max_prompt_length < len(prefix) + 1 or max_length < max_prompt_length + 2:
        raise DataError(
            f"need max_length >= max_prompt_length + 2 and max_prompt_length >= "
            f"{len(prefix) + 1}; got max_length={max_length}, "
            f"max_prompt_length={max_prompt_length}"
        )

    backend = getattr(tok, "backend_tokenizer", None)

    def ids(texts):
        if not texts:
            return []
        if backend is not None:  # same ids as tok(texts, add_special_tokens=False), less overhead
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return tok(texts, add_special_tokens=False)["input_ids"]

    p_ids = ids([p["prompt"] for p in pairs])
    c_ids = ids([p["chosen"] for p in pairs])
    r_ids = ids([p["rejected"] for p in pairs])
    n = len(pairs)
    out = TokenizedPairs([], [], [], np.zeros((n, 2), np.int32), np.zeros((n, 2), np.int32), np.zeros(n, np.uint8))
    for i, pair in enumerate(pairs):
        body = p_ids[i]
        if bos is not None and body[:1] == [bos]:
            body = body[1:]
        flags = 0
        raw_prompt = len(prefix) + len(body)
        responses = []
        for y in (c_ids[i], r_ids[i]):
            if not (pair.get("chat") and y and y[-1] in specials):
                y = y + [eos]
            responses.append(y)
        longer = max(len(y) for y in responses)
        keep = max_prompt_length - len(prefix)
        if len(body) > keep and (truncation == "always" or raw_prompt + longer > max_length):
            body = body[len(body) - keep :]
            flags |= PROMPT_CUT
        prompt = np.asarray(prefix + body, np.int32)
        # "always": what the prompt leaves; "trl": TRL's fixed response budget (also when the prompt
        # is shorter than max_prompt_length), applied only when the pair is still too long.
        budget = max_length - len(prompt)
        if truncation == "trl" and len(prompt) + longer > max_length:
            budget = max_length - max_prompt_length
        sides = []
        for side, y in enumerate(responses):
            out.raw_lengths[i, side] = raw_prompt + len(y)
            if len(y) > budget:
                flags |= RESPONSE_CUT
                if keep_eos:
                    y = y[: budget - 1] + y[-1:]
                else:
                    y = y[:budget]
                    flags |= LOST_EOS
            sides.append(np.asarray(y, np.int32))
            out.lengths[i, side] = len(prompt) + len(y)
        out.prompt.append(prompt)
        out.chosen.append(sides[0])
        out.rejected.append(sides[1])
        out.flags[i] = flags
    return out
