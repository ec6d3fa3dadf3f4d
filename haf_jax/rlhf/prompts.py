"""The RLHF prompts: any haf_jax data spec read through the data layer (prompts only), each prompt
once, in source order, formatted for the policy with the training template."""

from __future__ import annotations

from haf_jax import data
from haf_jax.data.formats import TEMPLATES

TEMPLATE_ALLOWANCE = 16  # tokens kept free for a template's words around a cut prompt


def load_prompts(
    spec: str,
    tokenizer,
    *,
    max_prompt_length: int,
    template: str = "none",
    split: str = "all",
    eval_fraction: float = 0.0,
):
    """[{"prompt": the policy's input text, "raw_prompt": the record's prompt}] of `spec`'s split,
    deduplicated. A prompt longer than `max_prompt_length` tokens keeps its end (as the data layer
    cuts prompts), so the sampler's cache holds prompt + completion. Chat records come rendered by
    the tokenizer's chat template (no template added)."""
    options = data.PairOptions(
        template=template, eval_fraction=eval_fraction, degenerate="keep", max_skip_fraction=1.0, max_length=4096
    )
    ds = data.load_pairs(spec, tokenizer, options, split=split)
    fmt, prefix = TEMPLATES[template]
    seen, out = set(), []
    for pair in ds.pairs:
        raw = pair["prompt"]
        budget = max_prompt_length - (0 if template == "none" or pair.get("chat") else TEMPLATE_ALLOWANCE)
        ids = tokenizer.encode(raw, add_special_tokens=False)
        if len(ids) > budget:
            raw = tokenizer.decode(ids[len(ids) - budget :])
        if raw in seen:
            continue
        seen.add(raw)
        out.append({"prompt": raw if pair.get("chat") else fmt.format(x=raw) + prefix, "raw_prompt": raw})
    if not out:
        raise data.DataError("no prompts", source=str(spec))
    return out
