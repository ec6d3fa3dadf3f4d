"""The training format as a chat template (haf_jax/data/chat_format.py): rendered and tokenised as a
PyTorch trainer does (TRL: ``add_special_tokens=False``), it gives the data layer's ids
(tokenize.encode_pairs) for every prompt template, on the bundled sample and on real tokenizers."""

import gzip
import json

import pytest
from jinja2 import TemplateError

from haf_jax.data import (
    TEMPLATES,
    DataError,
    chat_template,
    format_mismatch,
    load_tokenizer,
    sample_paths,
    with_training_format,
)
from haf_jax.data.formats import hh_single_turn_query, split_hh
from haf_jax.data.tokenize import encode_pairs

ODD = [  # characters a Jinja literal or the tokenizer could trip on
    ("Say \"hi\" {{ x }} {% if %} \\n and 'quotes'", "Fine: {{ y }} \\ done"),
    ("héllo 🙂\tTab", "ça va 🙂"),
]


def sample_turns(n: int):
    """(prompt, response) of the first n single-turn HH dialogues of the bundled sample (query and
    answer stripped, as a template run reads them)."""
    out = []
    with gzip.open(sample_paths()["data"], "rt") as f:
        for line in f:
            x, y = split_hh(json.loads(line)["chosen"])
            q = hh_single_turn_query(x)
            if q is not None and y.strip():
                out.append((q, y.strip()))
            if len(out) == n:
                return out
    return out


def data_layer_ids(tok, template, prompt, response):
    fmt, prefix = TEMPLATES[template]
    pair = {"prompt": fmt.format(x=prompt), "chosen": prefix + response, "rejected": prefix + response + "!"}
    enc = encode_pairs(tok, [pair], max_length=1 << 16, max_prompt_length=1 << 15)
    return [*enc.prompt[0].tolist()], [*enc.prompt[0].tolist(), *enc.chosen[0].tolist()]


def rendered_ids(tok, messages, **kw):
    return tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_rendered_conversation_is_the_data_layers_pair(tok, template):
    t = with_training_format(tok, template)
    fmt, prefix = TEMPLATES[template]
    for x, y in sample_turns(40) + ODD:
        prompt_ids, pair_ids = data_layer_ids(tok, template, x, y)
        user = [{"role": "user", "content": x}]
        assert rendered_ids(t, [*user, {"role": "assistant", "content": y}]) == pair_ids, (x, y)
        assert pair_ids[0] == tok.bos_token_id and pair_ids[-1] == tok.eos_token_id
        # the generation prompt is the data layer's prompt (what `sample` prompts a policy with)
        assert rendered_ids(t, user, add_generation_prompt=True) == prompt_ids
        # a completion generated after the prompt starts with the response prefix: written once
        assert rendered_ids(t, [*user, {"role": "assistant", "content": prefix + y}]) == pair_ids


def test_phi2_prefix_is_added_only_when_missing(tok):
    t = with_training_format(tok, "phi2")
    user = {"role": "user", "content": "Hi"}

    def render(y):
        return t.apply_chat_template([user, {"role": "assistant", "content": y}], tokenize=False)

    assert render("Yes.") == render(" Yes.") == "<bos>Instruct: Hi\nOutput: Yes.<eos>"
    assert t.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == "<bos>Instruct: Hi\nOutput:"


def test_tokenizer_without_bos(tok):
    import copy

    nobos = copy.deepcopy(tok)
    nobos.bos_token = None
    assert nobos.bos_token_id is None
    t = with_training_format(nobos, "mistral")
    _, pair_ids = data_layer_ids(nobos, "mistral", "Hi", "Yes.")
    got = rendered_ids(t, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}])
    assert got == pair_ids and tok.bos_token_id not in got


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], "got roles system, user"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "got roles user, user"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
         "got roles user, assistant, user"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "must be strings"),
    ],
)  # fmt: skip
def test_other_conversations_are_refused_with_what_was_given(tok, messages, match):
    with pytest.raises(TemplateError, match=match):
        with_training_format(tok, "none").apply_chat_template(messages, tokenize=False)


def test_unknown_template():
    with pytest.raises(DataError, match="unknown template 'chatml'"):
        chat_template("chatml")


def test_own_template_is_kept_by_name_and_saved(tok, tmp_path):
    assert tok.chat_template  # the bundled tokenizer has one (<|role|> turns)
    t = with_training_format(tok, "none")
    assert tok.chat_template != t.chat_template  # a copy: the loaded tokenizer is unchanged
    t.save_pretrained(tmp_path)
    back = load_tokenizer(str(tmp_path))
    user = [{"role": "user", "content": "Hi"}]
    assert back.apply_chat_template(user, tokenize=False) == "<bos>Hi"
    own = back.apply_chat_template(user, tokenize=False, chat_template="tokenizer")
    assert own == tok.apply_chat_template(user, tokenize=False) == "<bos><|user|>\nHi<eos>"
    again = with_training_format(back, "phi2")  # an export's tokenizer exported again: still one own template
    assert set(again.chat_template) == {"default", "tokenizer"}
    assert again.apply_chat_template(user, tokenize=False, chat_template="tokenizer") == own


@pytest.mark.parametrize("name, agrees", [("gpt2-tokenizer", True), ("llama2-tokenizer", False)])
def test_real_tokenizers_boundary(shared_data, name, agrees):
    """Byte-level BPE (GPT-2) splits prompt | response where the data layer does (so do Gemma's
    SentencePiece and the bundled BPE, measured in docs/DESIGN.md); Llama 2's SentencePiece starts a
    response tokenised alone with an extra "▁": `format_mismatch` says so."""
    real = load_tokenizer(shared_data / name)
    for template in TEMPLATES:
        problem = format_mismatch(real, template)
        assert (problem is None) == agrees, problem
        if not agrees:
            assert "'▁', '▁It'" in problem and "the data layer as" in problem
    if agrees:
        t = with_training_format(real, "none")
        for x, y in sample_turns(10):
            x = f"\n\nHuman: {x}\n\nAssistant:"
            assert (
                rendered_ids(t, [{"role": "user", "content": x}, {"role": "assistant", "content": " " + y}])
                == (data_layer_ids(real, "none", x, " " + y)[1])
            )
