"""The training format as a chat template: what an export's tokenizer renders conversations with.

PyTorch trainers (TRL's GRPOTrainer / PPO / RLOO, ...) build a reward model's input by rendering
[user prompt, assistant completion] with the reward tokenizer's chat template and tokenising the text
with ``add_special_tokens=False``; they read the reward at the last non-pad token. `chat_template`
renders exactly the tokenisation contract of tokenize.py for a prompt template (formats.TEMPLATES)::

    [user x]                 -> bos + fmt(x)                      (the generation prompt, as `sample`)
    [user x, assistant y]    -> bos + fmt(x) + prefix + y + eos   (reward read at the EOS)

`prefix` is the template's response prefix (phi2: a space) and is written only when y does not
already start with it: a completion a policy generated after fmt(x) starts with it, a response field
of a preference file does not. BOS / EOS are the tokenizer's (no BOS when it has none). The text
tokenises to the data layer's ids whenever the tokenizer splits fmt(x) | y where the data layer
does (it tokenises the two separately): true for byte-level BPE when y starts at a pre-token boundary
(a space, a letter after ":" or "]"), not when y glues onto the prompt's last pre-token
(e.g. "Assistant:" + "!"). Prompt truncation (max_prompt_length) is not reproduced: keep prompts
within the run's budget. One user message (and at most one assistant message after it) is accepted;
anything else raises a message naming what was given.
"""

from __future__ import annotations

import copy
import json

from haf_jax.data.errors import DataError
from haf_jax.data.formats import TEMPLATES

OWN_TEMPLATE_NAME = "tokenizer"  # an export keeps the tokenizer's own chat template under this name


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON escapes are Jinja escapes: \\n, \\", \\uXXXX)."""
    return json.dumps(text)


def chat_template(template: str) -> str:
    """The Jinja chat template that renders prompt template `template` (a formats.TEMPLATES name) as
    the data layer tokenises a training pair's prompt and chosen response (module docstring)."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    fmt, prefix = TEMPLATES[template]
    before, after = fmt.split("{x}")
    bad = _literal(f"the haf_jax {template!r} chat template takes one user message and optionally one assistant reply")
    return (
        "{%- if messages | length not in [1, 2] or messages[0]['role'] != 'user'"
        " or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
        "{{- raise_exception(" + bad + " + ', got roles ' + (messages | map(attribute='role') | join(', '))) -}}"
        "{%- endif -%}"
        "{%- for m in messages if m['content'] is not string -%}"
        "{{- raise_exception('message contents must be strings (' + m['role'] + ' is not)') -}}"
        "{%- endfor -%}"
        "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
        "{{- " + _literal(before) + " + messages[0]['content'] + " + _literal(after) + " -}}"
        "{%- if messages | length == 2 -%}"
        "{%- if not messages[1]['content'].startswith(" + _literal(prefix) + ") -%}"
        "{{- " + _literal(prefix) + " -}}"
        "{%- endif -%}"
        "{{- messages[1]['content'] + eos_token -}}"
        "{%- endif -%}"
    )


def with_training_format(tokenizer, template: str):
    """A copy of `tokenizer` whose default chat template is `chat_template(template)`; a chat
    template it already had stays available by the name OWN_TEMPLATE_NAME
    (``apply_chat_template(..., chat_template="tokenizer")``; TRL: ``chat_template_kwargs``)."""
    out = copy.deepcopy(tokenizer)
    own = getattr(tokenizer, "chat_template", None)
    named = dict(own) if isinstance(own, dict) else {"default": own} if own else {}
    previous = named.pop("default", None)
    if previous and OWN_TEMPLATE_NAME not in named:  # an export exported again keeps its first own template
        named[OWN_TEMPLATE_NAME] = previous
    rendered = chat_template(template)
    out.chat_template = {"default": rendered, **named} if named else rendered
    return out


# (prompt, response) probes of `format_mismatch`: an HH turn (the response starts with its space) and a bare
# question (the response glued to the template's end, as mistral's "[/INST]" + "It ...")
PROBES = (("\n\nHuman: What is two plus two?\n\nAssistant:", " It is four."), ("What is two plus two?", "It is four."))


def format_mismatch(tokenizer, template: str, probes=PROBES) -> str | None:
    """None when `chat_template(template)` rendered by `tokenizer` tokenises every probe (prompt,
    response) to the data layer's ids (tokenize.encode_pairs: BOS + prompt + response + EOS); else a
    message naming the first that does not and both token lists (e.g. Llama 2 / Mistral SentencePiece
    tokenizers: the data layer tokenises the response alone, which starts it with a "▁" token)."""
    from haf_jax.data.tokenize import encode_pairs

    rendered = chat_template(template)
    fmt, prefix = TEMPLATES[template]
    for prompt, response in probes:
        chosen = response if response.startswith(prefix) else prefix + response  # the template's rule
        pair = {"prompt": fmt.format(x=prompt), "chosen": chosen, "rejected": chosen}
        enc = encode_pairs(tokenizer, [pair], max_length=1 << 20, max_prompt_length=1 << 19)
        want = [*enc.prompt[0].tolist(), *enc.chosen[0].tolist()]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=rendered)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != want:
            show = tokenizer.convert_ids_to_tokens
            return (
                f"the chat template of template {template!r} tokenises {prompt!r} + {response!r} as {show(got)}, "
                f"the data layer as {show(want)}: rewards read through it differ from haf_jax's"
            )
    return None
