"""Tiny random transformers models over a word-level vocabulary, saved as Hugging Face directories
(tests/unit/test_sample.py, tests/unit/test_bon.py): 'w<i>' is token i for every i in [3, V), BOS 1,
EOS 2, so any generated id decodes. Every weight is perturbed (helpers.parity.perturb) so that no
default 0 or 1 can hide a wrong mapping."""

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers.parity import perturb

V, BOS, EOS = 300, 1, 2
FAMILIES = {
    # untied head, q/k/v/o biases, GQA
    "llama": (
        T.LlamaConfig,
        dict(num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True),
    ),
    # sliding window 6 (shorter than prompt + new tokens, so the cached decode must apply it), MQA, tied
    "mistral": (
        T.MistralConfig,
        dict(num_hidden_layers=2, num_key_value_heads=1, sliding_window=6, tie_word_embeddings=True),
    ),
}


def word_tokenizer():
    """Word-level: 'w<i>' is id i for every id of the vocabulary, so any generated id decodes."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_causal_lm(family, directory, seed=0):
    """A perturbed random transformers causal LM of `family` saved (safetensors + tokenizer) in
    `directory`; returns the torch model (eager attention, float32)."""
    cls, kw = FAMILIES[family]
    config = cls(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
        max_position_embeddings=128,
        **kw,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = perturb(T.AutoModelForCausalLM.from_config(config), seed=seed).eval()
    model.save_pretrained(directory, safe_serialization=True)
    word_tokenizer().save_pretrained(directory)
    return model
