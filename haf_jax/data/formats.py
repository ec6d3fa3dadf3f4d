"""Convert every record form to the explicit pair form ``{prompt, chosen, rejected, id?}``.

Full spec grammar accepted by `load_pairs`::

    SPEC   := SOURCE | "recipe:" NAME [":" SOURCE]        (NAME in RECIPES; SOURCE: sources.py)

With no SOURCE a recipe reads its hub dataset (`RECIPES[name].default_source`, online only).

Record forms (detected from the first row, or forced with ``fields={"form": ...}``):

- ``explicit``:  {"prompt": str, "chosen": str, "rejected": str}
- ``hh``:        {"chosen": str, "rejected": str} full dialogues; prompt = text up to and including
                 the last "\\n\\nAssistant:" of each; chosen/rejected = the rest.
- ``messages``:  {"prompt": [msg] | str, "chosen": [msg], "rejected": [msg]} or full conversations
                 {"chosen": [msg...], "rejected": [msg...]} sharing all but the last (assistant)
                 message; msg = {"role": str, "content": str}. Rendered once with the tokenizer's
                 chat template; the pair gets ``chat=True`` (rendered text, special tokens inside).
- ``labelled``:  {"prompt", "response_0", "response_1", "label"} with label 0/1 = the better one.
- ``ranking``:   {"prompt", "responses": [str]*N, "ranking": [best..worst indices]} or
                 ``"scores": [float]*N`` (higher better; equal scores give no pair); expanded to
                 all N(N-1)/2 ordered pairs.

``fields`` maps these canonical field names to the dataset's names, e.g.
``{"response_0": "answer_a", "response_1": "answer_b", "label": "winner_id"}``.

Pairs with an empty (whitespace-only) or identical chosen/rejected response ("degenerate") are
SKIPPED and counted by reason (`skipped`) with ``degenerate="skip"`` (default); with
``degenerate="keep"`` (the paper authors' behaviour, config key ``data.degenerate``) they stay
pairs, marked ``degenerate=reason`` and counted in `kept` instead: an empty response is then just
the template's response prefix + EOS, and an identical pair has equal rewards, so it counts as
wrong under strict accuracy. A prompt that differs between chosen and rejected (hh/messages) or
an HH text without an assistant turn is skipped in both modes (there is no pair to keep).
Recipe filters (multi-turn, ties, ...) are counted separately (`filtered`).
Templates (string forms only): `TEMPLATES` maps name -> (prompt format, response prefix).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

from haf_jax.data.errors import DataError, find_bad_text, type_name

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

TEMPLATES = {
    "none": ("{x}", ""),
    "phi2": ("Instruct: {x}\nOutput:", " "),
    "mistral": ("[INST] {x} [/INST]", ""),
}
FORMS = ("explicit", "hh", "messages", "labelled", "ranking")
DEGENERATE = ("skip", "keep")  # data.degenerate: what happens to empty/identical responses


@dataclasses.dataclass
class Converted:
    """Result of converting rows. pairs[k] = dict(prompt, chosen, rejected, id, chat, group);
    ``group`` = ordinal of the source row among rows that passed the recipe filters (splits are
    carved by group so expanded rankings never straddle train/eval). skipped: list of
    (group, reason) for skipped pairs; kept: list of (group, reason) for degenerate pairs kept
    (``degenerate="keep"``; they are also in `pairs`, with ``degenerate=reason``)."""

    pairs: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rows_read: int = 0
    groups: int = 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A paper dataset: how to turn one row into (x, y_chosen, y_rejected) or a filter reason."""

    convert: Callable[[dict, _Row], Any]  # -> (x, chosen, rejected) | str (filter reason)
    default_source: str
    first_eval_fraction: float | None = None  # eval = first fraction of the kept rows


def parse_spec(spec: Any) -> tuple[str | None, Any]:
    """Split ``recipe:NAME[:SOURCE]`` into (NAME, SOURCE); other specs -> (None, spec)."""
    if isinstance(spec, dict) and "recipe" in spec:
        rest = {k: v for k, v in spec.items() if k != "recipe"}
        name = spec["recipe"]
        check_recipe(name)
        return name, (rest or RECIPES[name].default_source)
    if isinstance(spec, str) and spec.startswith("recipe:"):
        name, _, source = spec[len("recipe:") :].partition(":")
        check_recipe(name)
        return name, (source or RECIPES[name].default_source)
    return None, spec


def check_recipe(name):
    """DataError unless `name` is a known recipe."""
    if name not in RECIPES:
        raise DataError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")


# ----------------------------------------------------------------------------- field access
class _Row:
    """Typed access to one row's fields with messages naming source, line/row and field."""

    def __init__(self, row: dict, source: str, where: str, fields: dict):
        self.row, self.source, self.where, self.fields = row, source, where, fields

    def name(self, key: str) -> str:
        return self.fields.get(key, key)

    def has(self, key: str) -> bool:
        return self.name(key) in self.row

    def error(self, key: str | None, message: str) -> DataError:
        return DataError(message, source=self.source, where=self.where, field=None if key is None else self.name(key))

    def get(self, key: str):
        name = self.name(key)
        if name not in self.row:
            raise self.error(key, f"missing field (row has {sorted(self.row)})")
        value = self.row[name]
        if value is None:
            raise self.error(key, "expected a value, got null")
        if not isinstance(value, (str, int, float)):
            bad = find_bad_text(value)  # non-UTF-8 bytes from a TFDS/hub source
            if bad:
                raise self.error(key, bad)
        return value

    def str(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type_name(value)}")
        return value

    def messages(self, key: str) -> list:
        value = self.get(key)
        if isinstance(value, str) and key == "prompt":
            return [{"role": "user", "content": value}]
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected a non-empty list of messages, got {type_name(value)}")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise self.error(key, f"message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")
        return [{"role": m["role"], "content": m["content"]} for m in value]


# ----------------------------------------------------------------------------- forms
def detect_form(row: dict, fields: dict, source: str | None = None, where: str | None = None) -> str:
    """Guess the record form from one row's field names (module docstring)."""
    if "form" in fields:
        if fields["form"] not in FORMS:
            raise DataError(f"unknown form {fields['form']!r}; known: {', '.join(FORMS)}")
        return fields["form"]
    has = lambda k: fields.get(k, k) in row
    if has("chosen") and has("rejected"):
        if isinstance(row[fields.get("chosen", "chosen")], list):
            return "messages"
        return "explicit" if has("prompt") else "hh"
    if has("response_0") and has("response_1") and has("label"):
        return "labelled"
    if has("responses") and (has("ranking") or has("scores")):
        return "ranking"
    raise DataError(
        f"cannot recognise the record form from fields {sorted(row)}; expected "
        "prompt/chosen/rejected, chosen/rejected (HH dialogues or message lists), "
        "response_0/response_1/label or responses/ranking|scores (see fields=)",
        source=source,
        where=where,
    )


def split_hh(text: str) -> tuple[str, str] | None:
    """HH dialogue -> (prompt incl. the last '\\n\\nAssistant:', response) or None."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def hh_single_turn_query(prompt: str) -> str | None:
    """The human text of a single-turn HH prompt, else None."""
    if prompt.count(HH_HUMAN) != 1 or prompt.count(HH_ASSISTANT) != 1 or not prompt.startswith(HH_HUMAN):
        return None
    return prompt[len(HH_HUMAN) : -len(HH_ASSISTANT)].strip()


def _triples(form: str, r: _Row, template: str, tokenizer):
    """One row -> list of (prompt, chosen, rejected, chat, id suffix) | str skip reason."""
    if form == "explicit":
        return [_apply(template, r.str("prompt"), r.str("chosen"), r.str("rejected"))]
    if form == "hh":
        c, j = r.str("chosen"), r.str("rejected")
        sc, sj = split_hh(c), split_hh(j)
        if sc is None or sj is None:
            return "no_assistant_turn"
        if sc[0] != sj[0]:
            return "prompt_mismatch"
        x = sc[0]
        if template != "none":
            q = hh_single_turn_query(x)
            return [_apply(template, q if q is not None else x.strip(), sc[1].strip(), sj[1].strip())]
        return [(x, sc[1], sj[1], False, "")]
    if form == "messages":
        if r.has("prompt"):
            p, c, j = r.messages("prompt"), r.messages("chosen"), r.messages("rejected")
        else:
            c, j = r.messages("chosen"), r.messages("rejected")
            if c[:-1] != j[:-1]:
                return "prompt_mismatch"
            p, c, j = c[:-1], c[-1:], j[-1:]
        return [_render_chat(tokenizer, p, c, j, r)]
    if form == "labelled":
        label = _zero_or_one(r, "label")
        y = (r.str("response_0"), r.str("response_1"))
        return [_apply(template, r.str("prompt"), y[label], y[1 - label])]
    if form == "ranking":
        x = r.str("prompt")
        ys = r.get("responses")
        if not isinstance(ys, list) or not all(isinstance(y, str) for y in ys):
            raise r.error("responses", "expected a list of strings")
        if r.has("ranking"):
            order = r.get("ranking")
            if not isinstance(order, list) or sorted(map(repr, order)) != sorted(map(repr, range(len(ys)))):
                raise r.error("ranking", f"expected a permutation of 0..{len(ys) - 1}, got {order!r:.80}")
            score = {i: -pos for pos, i in enumerate(order)}
        else:
            sc = r.get("scores")
            if (
                not isinstance(sc, list)
                or len(sc) != len(ys)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sc)
            ):
                raise r.error("scores", f"expected {len(ys)} numbers")
            score = dict(enumerate(sc))
        out = []
        for a in range(len(ys)):
            for b in range(a + 1, len(ys)):
                if score[a] == score[b]:
                    continue
                win, lose = (a, b) if score[a] > score[b] else (b, a)
                out.append(_apply(template, x, ys[win], ys[lose], f"#{win}>{lose}"))
        return out
    raise AssertionError(form)


def _zero_or_one(r: _Row, key: str) -> int:
    """Field `key` as 0 or 1 (also the strings "0" / "1"), else a DataError naming it and the value."""
    value = r.get(key)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        value = int(value)
    if value not in (0, 1) or isinstance(value, bool):
        raise r.error(key, f"expected 0 or 1, got {value!r}")
    return value


def _apply(template, x, yc, yr, suffix=""):
    fmt, pre = TEMPLATES[template]
    return fmt.format(x=x), pre + yc, pre + yr, False, suffix


def _render_chat(tokenizer, prompt_msgs, chosen_msgs, rejected_msgs, r: _Row):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise r.error(None, "message-list records need a tokenizer with a chat template")
    try:
        p = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        outs = []
        for resp in (chosen_msgs, rejected_msgs):
            full = tokenizer.apply_chat_template(prompt_msgs + resp, tokenize=False)
            if not full.startswith(p):
                raise r.error(
                    None,
                    "the chat template does not render the prompt as a prefix of the "
                    "conversation; cannot locate the response",
                )
            outs.append(full[len(p) :].rstrip())  # assistant turn, ending at its end-of-turn token
    except DataError:
        raise
    except Exception as e:  # template raise_exception(...) and friends
        raise r.error(None, f"chat template failed: {e}") from None
    empty = [not "".join(m["content"] for m in msgs).strip() for msgs in (chosen_msgs, rejected_msgs)]
    return p, outs[0], outs[1], True, "", empty


# ----------------------------------------------------------------------------- recipes
def hh_authors_turn(text: str) -> tuple[str, str] | None:
    """The paper authors' single-turn split of an HH dialogue (their get_anthropic_hh): single-turn
    when the text holds exactly one "\n\nHuman: "; the query is what follows it up to the first
    "\n\nAssistant: ", the response what follows that up to a second "\n\nAssistant: " if the response
    itself holds one (the rest is dropped). -> (query, response), unstripped, or None (multi-turn)."""
    human = text.split(HH_HUMAN + " ")
    if len(human) != 2:
        return None
    turn = human[1].split(HH_ASSISTANT + " ")
    return (turn[0], turn[1]) if len(turn) >= 2 else None


def _hh_recipe(row: dict, r: _Row):
    """The authors' rule (hh_authors_turn): it keeps a single-turn dialogue whose response quotes a
    second "\n\nAssistant: " (1 of 2,312 rows of harmless-base test: 662 kept, as theirs)."""
    c, j = r.str("chosen"), r.str("rejected")
    if split_hh(c) is None or split_hh(j) is None:
        return "no_assistant_turn"
    tc, tj = hh_authors_turn(c), hh_authors_turn(j)
    if tc is None or tj is None:
        return "multi_turn"
    if tc[0].strip() != tj[0].strip():
        return "prompt_mismatch"
    return tc[0], tc[1], tj[1]


BEAVERTAILS_LABELS = ("safer_response_id", "safety_flags")


def _beavertails(row: dict, r: _Row, *, label: str = "safer_response_id"):
    """Pairs with exactly one safe response (is_response_*_safe). chosen: the `safer_response_id`
    response (the authors' get_data_beaver), or with label="safety_flags" the flagged-safe one. Texts
    pass through unstripped, as the authors'."""
    safe = []
    for k in ("is_response_0_safe", "is_response_1_safe"):
        v = r.get(k)
        if not isinstance(v, bool):
            raise r.error(k, f"expected true/false, got {v!r}")
        safe.append(v)
    if safe[0] == safe[1]:
        return "not_exactly_one_safe"
    y = (r.str("response_0"), r.str("response_1"))
    s = _zero_or_one(r, "safer_response_id") if label == "safer_response_id" else 0 if safe[0] else 1
    return r.str("prompt"), y[s], y[1 - s]


def _alpaca(row: dict, r: _Row):
    """The authors' prompt (their train_rm.py): instruction + "\n" + input for every row, also when
    the input is empty or missing (then the prompt ends in "\n")."""
    x = r.str("instruction")
    extra = r.get("input") if r.row.get(r.name("input")) is not None else ""
    if not isinstance(extra, str):
        raise r.error("input", f"expected a string, got {type_name(extra)}")
    x = f"{x}\n{extra}"
    pref = r.get("preference")
    if pref not in (1, 2) or isinstance(pref, bool):
        raise r.error("preference", f"expected 1 or 2, got {pref!r}")
    y = (r.str("output_1"), r.str("output_2"))
    return x, y[pref - 1], y[2 - pref]


def _arena(row: dict, r: _Row):
    winner = r.str("winner")
    if winner.startswith("tie"):
        return "tie"
    if winner not in ("model_a", "model_b"):
        raise r.error("winner", f"expected model_a, model_b or tie*, got {winner!r}")
    a, b = r.messages("conversation_a"), r.messages("conversation_b")
    if len(a) != 2 or len(b) != 2 or (r.has("turn") and r.get("turn") != 1):
        return "multi_turn"
    if a[0]["role"] != "user" or a[1]["role"] != "assistant" or b[1]["role"] != "assistant":
        raise r.error("conversation_a", "expected [user, assistant] messages")
    if a[0]["content"] != b[0]["content"]:
        return "prompt_mismatch"
    ya, yb = a[1]["content"], b[1]["content"]
    return (a[0]["content"], ya, yb) if winner == "model_a" else (a[0]["content"], yb, ya)


RECIPES = {
    "hh_helpful": Recipe(_hh_recipe, "hf:Anthropic/hh-rlhf:data_dir=helpful-base:train"),
    "hh_harmless": Recipe(_hh_recipe, "hf:Anthropic/hh-rlhf:data_dir=harmless-base:train"),
    "beavertails_safe": Recipe(_beavertails, "hf:PKU-Alignment/PKU-SafeRLHF:train"),
    # the same pairs, chosen = the response flagged safe (is_response_*_safe) instead of safer_response_id
    "beavertails_safe_flags": Recipe(
        functools.partial(_beavertails, label="safety_flags"), "hf:PKU-Alignment/PKU-SafeRLHF:train"
    ),
    "alpaca_human_pref": Recipe(
        _alpaca, "hf:tatsu-lab/alpaca_farm:alpaca_human_preference:preference", first_eval_fraction=0.10
    ),
    "chatbot_arena": Recipe(_arena, "hf:lmsys/chatbot_arena_conversations:train", first_eval_fraction=0.05),
}


# ----------------------------------------------------------------------------- driver
def convert_rows(
    rows: Iterable[tuple[str, dict]],
    *,
    source: str,
    recipe: str | None = None,
    template: str = "none",
    fields: dict | None = None,
    tokenizer=None,
    degenerate: str = "skip",
) -> Converted:
    """Convert raw (where, row) pairs to explicit pairs; see `Converted` and the module docstring."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if degenerate not in DEGENERATE:
        raise DataError(f"unknown degenerate={degenerate!r}; known: {', '.join(DEGENERATE)}")
    fields = dict(fields or {})
    out = Converted()
    form = None
    rec = RECIPES[recipe] if recipe else None
    for where, row in rows:
        out.rows_read += 1
        r = _Row(row, source, where, fields)
        if rec is not None and recipe.startswith("hh_"):
            got = rec.convert(row, r)
            if isinstance(got, str):
                out.filtered[got] += 1
                continue
            q, yc, yr = got
            if template == "none":  # the dialogue's own text: "\n\nHuman: q\n\nAssistant:" + " response"
                result = [(f"{HH_HUMAN} {q}{HH_ASSISTANT}", " " + yc, " " + yr, False, "")]
            else:  # the authors strip the HH texts
                result = [_apply(template, q.strip(), yc.strip(), yr.strip())]
        elif rec is not None:
            got = rec.convert(row, r)
            if isinstance(got, str):
                out.filtered[got] += 1
                continue
            result = [_apply(template, *got)]
        else:
            form = form or detect_form(row, fields, source, where)
            result = _triples(form, r, template, tokenizer)
        group = out.groups
        out.groups += 1
        if isinstance(result, str):
            out.skipped.append((group, result))
            continue
        base_id = row.get(fields.get("id", "id"))
        for item in result:
            prompt, chosen, rejected, chat, suffix = item[:5]
            empty = item[5] if len(item) > 5 else (not chosen.strip(), not rejected.strip())
            reason = (
                "empty_chosen"
                if empty[0]
                else "empty_rejected"
                if empty[1]
                else "identical"
                if chosen == rejected
                else None
            )
            if reason and degenerate == "skip":
                out.skipped.append((group, reason))
                continue
            pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": chat, "group": group}
            if reason:
                out.kept.append((group, reason))
                pair["degenerate"] = reason
            if base_id is not None:
                pair["id"] = f"{base_id}{suffix}"
            out.pairs.append(pair)
    return out
