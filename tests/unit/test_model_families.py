"""Llama, Mistral, Qwen2 and Phi against `transformers` (PyTorch, eager attention, float32), the
KV-cache decoder of every family, the non-Gemma preset sizes and the model_type checks.

As in test_model_hf.py every torch model is built from a tiny random config with ALL weights
perturbed, saved with safetensors and read by haf_jax.model.hf; no downloads. Each family has two
variants that between them switch on every option that changes its math; `test_each_option_matters`
then flips each option alone in our config (or zeroes its bias tensors) to show the parity test
would catch it. The measured errors are printed (`pytest -s`).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from helpers.parity import (
    assert_params_equal,
    hf_reference,
    logits as _logits,
    pair_batch,
    pairs as _pairs,
    perturb as _perturb,
    right_padded,
)
from tokenizers import Tokenizer, models, pre_tokenizers

from haf_jax.core import params as params_lib
from haf_jax.model import families, heads, hf, layers
from haf_jax.model.config import FULL, SLIDING
from haf_jax.model.families import PRESETS

T.logging.set_verbosity_error()

V, UNK, BOS, EOS = 300, 0, 1, 2
N_WORDS = 250  # the test tokenizers know ids [0, 250): embedding rows 250..299 are free for a pad token
# Against transformers (float32, eager): the largest errors measured were 2.2e-6 on rewards (|r| <= 2.4) and
# 2.0e-5 on summed log-probs (|logp| ~ 200, relative 2.0e-7), test_model_hf.py and test_model_families.py;
# the tolerances are ~5x those (the former 2e-3 / 1e-4 were ~1000x).
REWARD_TOL = dict(atol=1e-5, rtol=0)
LOGP_TOL = dict(atol=1e-5, rtol=5e-7)
LOGIT_TOL = 1e-4  # max |logit error| vs transformers
FLIP_MIN = 1e-3  # an option changed alone must push the logit error above this ...
GELU_FLIP_MIN = 3e-4  # ... except exact vs tanh GeLU, which differ by < 5e-4 per activation (still 100x the
# parity errors measured here, 2e-6 to 1e-5)

_COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=None,
    num_labels=1,
    max_position_embeddings=128,
)

# name -> (HF config class, kwargs). Between the two variants of a family every option is on somewhere.
VARIANTS = {
    # biases on q/k/v/o and the MLP, head_dim 24 != 64 / 4, llama3 frequency bands that bend at these
    # positions (original context 16), untied head, non-default eps
    "llama-a": (
        T.LlamaConfig,
        dict(
            num_hidden_layers=2,
            head_dim=24,
            attention_bias=True,
            mlp_bias=True,
            rms_norm_eps=1e-3,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # linear scaling, tied head, multi-head (no GQA), three layers
    "llama-b": (
        T.LlamaConfig,
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_theta=500.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ),
    # window 5 on every layer (sequences of 24), GQA, untied
    "mistral-a": (T.MistralConfig, dict(num_hidden_layers=2, sliding_window=5, tie_word_embeddings=False)),
    # no window, MQA, tied
    "mistral-b": (
        T.MistralConfig,
        dict(
            num_hidden_layers=2, sliding_window=None, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000.0
        ),
    ),
    # q/k/v biases, window 5 on the layers from 1 on, untied
    "qwen2-a": (
        T.Qwen2Config,
        dict(
            num_hidden_layers=3,
            use_sliding_window=True,
            max_window_layers=1,
            sliding_window=5,
            tie_word_embeddings=False,
            rms_norm_eps=1e-3,
        ),
    ),
    # no window, tied, MQA (like Qwen2-0.5B's 14 / 2 heads)
    "qwen2-b": (T.Qwen2Config, dict(num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=True)),
    # rotary on 6 of 16 dims, LayerNorm on q/k heads, gelu_new, large eps; BOS = EOS as in phi-2
    "phi-a": (
        T.PhiConfig,
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,
            partial_rotary_factor=0.4,
            qk_layernorm=True,
            layer_norm_eps=1e-2,
            hidden_act="gelu_new",
            bos_token_id=EOS,
        ),
    ),
    # the default 0.5 rotary, exact gelu, GQA, no q/k norm
    "phi-b": (T.PhiConfig, dict(num_hidden_layers=2, hidden_act="gelu", layer_norm_eps=1e-5)),
}


def _hf_config(name):
    cls, kw = VARIANTS[name]
    return cls(**{**_COMMON, **kw})


def _tokenizer(family):
    """A word-level tokenizer over ids [0, 250) with EOS and no pad token, shaped like the family's:
    Llama/Mistral have <unk>; Qwen2 base pads with its EOS; Phi's BOS = EOS = UNK (GPT-2's)."""
    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, N_WORDS)}}
    if family == "phi":
        vocab = {"<|x|>": 0, "<|y|>": 1, "<|endoftext|>": EOS, **{f"w{i}": i for i in range(3, N_WORDS)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
        special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    elif family == "qwen2":
        tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
        special = dict(eos_token="</s>", pad_token="</s>")
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


class Ckpt:
    """Perturbed torch causal LM + sequence classifier sharing one trunk, saved to disk, with the
    reference logits of a right-padded batch."""

    lengths = (24, 17, 9)

    def __init__(self, name, root):
        torch.manual_seed(0)
        self.name, self.family = name, name.split("-")[0]
        self.hf_config = _hf_config(name)
        self.hf_config._attn_implementation = "eager"
        self.seq = _perturb(
            T.AutoModelForSequenceClassification.from_config(self.hf_config), seed=list(VARIANTS).index(name)
        ).eval()
        self.causal = T.AutoModelForCausalLM.from_config(self.hf_config).eval()
        self.causal.model.load_state_dict(self.seq.model.state_dict())
        self.causal.tie_weights()
        if not self.hf_config.tie_word_embeddings:  # its own head (and Phi's head bias), perturbed too
            _perturb(self.causal.lm_head, seed=100 + list(VARIANTS).index(name))
        for m in (self.seq, self.causal):
            m.config._attn_implementation = "eager"
        self.causal_dir, self.seq_dir = root / "causal", root / "seq"
        self.causal.save_pretrained(self.causal_dir, safe_serialization=True)
        self.seq.save_pretrained(self.seq_dir, safe_serialization=True)
        self.config, _ = hf.load_hf_config(self.causal_dir)
        self.params, self.info = hf.load_params(self.causal_dir, self.config)

        width = max(self.lengths)
        self.tokens = _tokens(np.random.default_rng(0), self.lengths, width)
        self.last = np.array(self.lengths, np.int32) - 1
        self.mask = np.arange(width)[None] < np.array(self.lengths)[:, None]
        with torch.no_grad():
            self.ref_logits = self.causal(
                input_ids=torch.tensor(self.tokens, dtype=torch.long),
                attention_mask=torch.tensor(self.mask, dtype=torch.long),
            ).logits.numpy()

    def logit_error(self, params, config, jit=True):
        ours = (_logits if jit else heads.full_logits)(params, config, self.tokens, self.last)
        return float(np.abs(np.asarray(ours) - self.ref_logits)[self.mask].max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def ckpt(request, tmp_path_factory):
    return Ckpt(request.param, tmp_path_factory.mktemp(request.param))


def _tokens(rng, lengths, width, pad=0):
    return right_padded(rng, lengths, width, high=N_WORDS, pad=pad, bos=BOS, eos=EOS)


def _pair_batch(rng, spec, width, pad=0):
    return pair_batch(rng, spec, width, high=N_WORDS, pad=pad, bos=BOS, eos=EOS)


PAIRS = [(4, 3, 6), (10, 30, 22), (7, 12, 2)]  # pair 0 is mostly padding next to its neighbours
WIDTH = 40


# ----------------------------------------------------------------------------- (a) logits parity
def test_logits_parity(ckpt):
    assert ckpt.info["reward_head"] == "zero-initialised"
    c = ckpt.config
    expected = {
        "llama-a": dict(
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            head_dim=24,
            rope_type="llama3",
            rope_factor=8.0,
            rope_original_max_positions=16,
            tie_word_embeddings=False,
            norm_eps=1e-3,
        ),
        "llama-b": dict(rope_type="linear", rope_factor=4.0, tie_word_embeddings=True, num_kv_heads=4),
        "mistral-a": dict(layer_types=(SLIDING, SLIDING), sliding_window=5, num_kv_heads=2),
        "mistral-b": dict(layer_types=(FULL, FULL), sliding_window=None, tie_word_embeddings=True),
        "qwen2-a": dict(layer_types=(FULL, SLIDING, SLIDING), sliding_window=5, qkv_bias=True, o_bias=False),
        "qwen2-b": dict(layer_types=(FULL, FULL), sliding_window=None, tie_word_embeddings=True),
        "phi-a": dict(
            partial_rotary_factor=0.4,
            qk_norm=True,
            norm_eps=1e-2,
            activation="gelu_tanh",
            lm_head_bias=True,
            block="parallel",
            norm="layer",
            bos_token_id=EOS,
        ),
        "phi-b": dict(partial_rotary_factor=0.5, qk_norm=False, activation="gelu", num_kv_heads=2),
    }[ckpt.name]
    assert {k: getattr(c, k) for k in expected} == expected
    if ckpt.name == "qwen2-a":  # transformers itself applies the window on those layers
        assert ckpt.causal.model.layers[1].self_attn.sliding_window == 5
        assert ckpt.causal.model.layers[0].self_attn.sliding_window is None

    err = ckpt.logit_error(ckpt.params, c)
    print(f"\n[parity] {ckpt.name}: max |logit error| = {err:.2e} (|logits| up to {np.abs(ckpt.ref_logits).max():.1f})")
    assert err <= LOGIT_TOL, f"{ckpt.name}: max |logit error| {err}"
    assert np.abs(ckpt.ref_logits).max() > 0.5  # logits are not trivially small


# ----------------------------------------------------------------------------- (2) each option matters
def _zero(params, *leaf_names):
    """A copy of params with every leaf whose name is in leaf_names set to zero (all layers)."""
    flat = {path: (jnp.zeros_like(v) if path[-1] in leaf_names else v) for path, v in _flatten(params).items()}
    assert any(path[-1] in leaf_names for path in flat), leaf_names
    return _unflatten(flat)


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def _unflatten(flat):
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _with_norm_bias(params):
    """Adds a zero LayerNorm bias beside every norm scale (RMSNorm -> LayerNorm needs one)."""
    flat = _flatten(params)
    flat.update({path[:-1] + ("bias",): jnp.zeros_like(v) for path, v in list(flat.items()) if path[-1] == "scale"})
    return _unflatten(flat)


def _with_post_attention_norm(params):
    """Parallel -> pre-norm needs a pre-MLP norm: a copy of each layer's input norm."""
    return {
        k: ({**v, "post_attention_layernorm": v["input_layernorm"]} if k.startswith("layers_") else v)
        for k, v in params.items()
    }


def _flips(name, c):
    """(label, config, params transform) of each option of the variant changed alone (built lazily:
    each variant's own flips only)."""
    r = functools.partial(dataclasses.replace, c)
    same = lambda p: p
    all_full = dict(layer_types=(FULL,) * c.num_layers, sliding_window=None)
    all_sliding = dict(layer_types=(SLIDING,) * c.num_layers)
    no_qkv_bias = lambda p: _zero(p, "q_proj_bias", "k_proj_bias", "v_proj_bias")
    common = [
        (
            f"activation {c.activation}->{'gelu_tanh' if c.activation != 'gelu_tanh' else 'gelu'}",
            r(activation="gelu_tanh" if c.activation != "gelu_tanh" else "gelu"),
            same,
        )
    ]
    if c.family != "phi":
        common += [
            ("norm rms->layer", r(norm="layer"), _with_norm_bias),
            ("norm x*w -> x*(1+w) (Gemma)", r(norm_offset=True), same),
            ("mlp gated->plain", r(mlp="plain"), same),
            ("block pre->parallel", r(block="parallel"), same),
        ]
    if not c.tie_word_embeddings:
        common.append(("untied->tied head", r(tie_word_embeddings=True), same))
    return (
        common
        + {
            "llama-a": lambda: [
                ("rope llama3->default", r(rope_type="default"), same),
                ("q/k/v biases zeroed", c, no_qkv_bias),
                ("o bias zeroed", c, lambda p: _zero(p, "o_proj_bias")),
                ("mlp biases zeroed", c, lambda p: _zero(p, "gate_proj_bias", "up_proj_bias", "down_proj_bias")),
                ("rms eps 1e-3->1e-6", r(norm_eps=1e-6), same),
            ],
            "llama-b": lambda: [
                ("rope linear->default", r(rope_type="default"), same),
                ("rope linear factor 4->2", r(rope_factor=2.0), same),
                ("rope_theta 500->10000", r(rope_theta=10_000.0), same),
            ],
            "mistral-a": lambda: [
                ("sliding window 5->none", r(**all_full), same),
                ("sliding window 5->8", r(sliding_window=8), same),
            ],
            "mistral-b": lambda: [("no window -> window 5", r(**all_sliding, sliding_window=5), same)],
            "qwen2-a": lambda: [
                ("q/k/v biases zeroed", c, no_qkv_bias),
                ("sliding window off", r(**all_full), same),
                ("max_window_layers 1->0", r(**all_sliding), same),
                ("sliding window 5->8", r(sliding_window=8), same),
                ("rms eps 1e-3->1e-6", r(norm_eps=1e-6), same),
            ],
            "qwen2-b": lambda: [("q/k/v biases zeroed", c, no_qkv_bias)],
            "phi-a": lambda: [
                ("partial rotary 0.4->0.5", r(partial_rotary_factor=0.5), same),
                ("partial rotary 0.4->1.0", r(partial_rotary_factor=1.0), same),
                ("q/k LayerNorm off", r(qk_norm=False), same),
                ("LM head bias zeroed", c, lambda p: _zero(p, "lm_head_bias")),
                ("q/k/v biases zeroed", c, no_qkv_bias),
                ("dense (o) bias zeroed", c, lambda p: _zero(p, "dense_bias")),
                ("fc1/fc2 biases zeroed", c, lambda p: _zero(p, "fc1_bias", "fc2_bias")),
                ("norm layer->rms", r(norm="rms"), same),
                ("LayerNorm biases zeroed", c, lambda p: _zero(p, "bias")),
                ("block parallel->pre", r(block="pre"), _with_post_attention_norm),
                ("layer_norm_eps 1e-2->1e-5", r(norm_eps=1e-5), same),
            ],
            "phi-b": lambda: [
                ("partial rotary 0.5->0.4", r(partial_rotary_factor=0.4), same),
                ("q/k/v biases zeroed", c, no_qkv_bias),
            ],
        }[name]()
    )


def test_each_option_matters(ckpt):
    """Each option of the variant, changed alone in our config (or its bias tensors zeroed), breaks
    the match with transformers: the parity test above really exercises it."""
    errors = {}
    for label, config, transform in _flips(ckpt.name, ckpt.config):
        # eager: each flip is a different static config, and op-by-op on these shapes beats a compile
        errors[label] = ckpt.logit_error(transform(ckpt.params), config, jit=False)
    print(f"\n[sensitivity] {ckpt.name}: " + "; ".join(f"{k}: {v:.2e}" for k, v in errors.items()))
    weak = {k: v for k, v in errors.items() if not v > (GELU_FLIP_MIN if "activation gelu" in k else FLIP_MIN)}
    assert not weak, f"{ckpt.name}: options whose change leaves the logits within {FLIP_MIN}: {weak}"


# ----------------------------------------------------------------------------- (b) rewards and log-probs


def _seq_params(ckpt):
    """Rewards from the *ForSequenceClassification checkpoint; an untied one lacks the LM head, so
    its log-probs come from the *ForCausalLM checkpoint (same trunk)."""
    if ckpt.config.tie_word_embeddings:
        params, info = hf.load_params(ckpt.seq_dir, ckpt.config)
        assert info["reward_head"] == "loaded"
        return params
    with pytest.raises(ValueError, match=r"has no 'lm_head\.weight'.*ForCausalLM"):
        hf.load_params(ckpt.seq_dir, ckpt.config)
    score = ckpt.seq.score.weight.detach().numpy()  # [1, D]
    return {**ckpt.params, "reward_head": jnp.asarray(score.T)}


def test_rewards_and_logprobs_match_transformers(ckpt):
    params = _seq_params(ckpt)
    np.testing.assert_array_equal(np.asarray(params["reward_head"])[:, 0], ckpt.seq.score.weight.detach().numpy()[0])
    batch = _pair_batch(np.random.default_rng(1), PAIRS, WIDTH)
    out = jax.tree.map(np.asarray, _pairs(params, ckpt.config, batch))
    ref = np.array(
        [
            [
                hf_reference(
                    ckpt.seq,
                    ckpt.causal,
                    batch["tokens"][b, j, : batch["last_index"][b, j] + 1],
                    batch["response_mask"][b, j, : batch["last_index"][b, j] + 1],
                )
                for j in range(2)
            ]
            for b in range(len(PAIRS))
        ]
    )
    reward_err, logp_err = np.abs(out.reward_Bx2 - ref[..., 0]).max(), np.abs(out.logp_Bx2 - ref[..., 1]).max()
    print(
        f"\n[pairs] {ckpt.name}: max |reward error| = {reward_err:.2e}, max |logp error| = {logp_err:.2e} "
        f"(|logp| up to {np.abs(ref[..., 1]).max():.0f})"
    )
    np.testing.assert_allclose(out.reward_Bx2, ref[..., 0], **REWARD_TOL)
    np.testing.assert_allclose(out.logp_Bx2, ref[..., 1], **LOGP_TOL)
    np.testing.assert_array_equal(out.n_tokens_Bx2, batch["response_mask"][:, :, 1:].sum(-1))
    assert np.abs(ref[..., 0]).max() > 0.1  # the reward head is not trivially zero


# ----------------------------------------------------------------------------- (c) export round trip
def test_export_round_trip(ckpt, tmp_path):
    params = _seq_params(ckpt)
    tokenizer = _tokenizer(ckpt.family)
    hf.save_hf(params, ckpt.config, tmp_path / "rm", kind="reward_model", tokenizer=tokenizer)
    hf.save_hf(params, ckpt.config, tmp_path / "policy", kind="policy", tokenizer=tokenizer)
    assert tokenizer.pad_token_id == (EOS if ckpt.family == "qwen2" else None)  # the caller's is not modified

    # the pad token of the reward model: never EOS; <unk> where the tokenizer has a distinct one,
    # else a new <|pad|> at the first free embedding row
    expected_pad = UNK if ckpt.family in ("llama", "mistral") else N_WORDS
    rm_json = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert rm_json["pad_token_id"] == expected_pad and rm_json["eos_token_id"] == EOS
    saved_tok = T.AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert saved_tok.pad_token_id == expected_pad != saved_tok.eos_token_id

    for sub, kind in (("rm", "loaded"), ("policy", "zero-initialised")):
        config, _ = hf.load_hf_config(tmp_path / sub)
        assert dataclasses.replace(config, pad_token_id=ckpt.config.pad_token_id) == ckpt.config
        back, info = hf.load_params(tmp_path / sub, config)
        assert info["reward_head"] == kind
        assert_params_equal(back, params, zero_reward_head=sub == "policy")

    rm = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager")
    policy = T.AutoModelForCausalLM.from_pretrained(tmp_path / "policy", attn_implementation="eager")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == expected_pad
    assert type(rm).__name__ == type(ckpt.seq).__name__ and type(policy).__name__ == type(ckpt.causal).__name__
    # right-padded with the exported pad id: transformers reads the reward at the last non-pad token (the EOS)
    batch = _pair_batch(np.random.default_rng(1), PAIRS, WIDTH, pad=expected_pad)
    out = jax.tree.map(np.asarray, _pairs(params, ckpt.config, batch))
    n = 2 * len(PAIRS)
    tokens = torch.tensor(batch["tokens"].reshape(n, WIDTH), dtype=torch.long)
    attn = (tokens != expected_pad).long()
    with torch.no_grad():
        rewards = rm(input_ids=tokens, attention_mask=attn).logits[:, 0].numpy()
        logits = policy(input_ids=tokens, attention_mask=attn).logits.double()
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    mask = torch.tensor(batch["response_mask"].reshape(n, WIDTH)[:, 1:], dtype=torch.float64)
    np.testing.assert_allclose(out.reward_Bx2.reshape(n), rewards, **REWARD_TOL)
    np.testing.assert_allclose(out.logp_Bx2.reshape(n), (logp * mask).sum(-1).numpy(), **LOGP_TOL)


# ----------------------------------------------------------------------------- (3) KV-cache decoding
_GEMMA_COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
DECODE_CONFIGS = {
    "gemma": lambda: T.GemmaConfig(num_hidden_layers=2, **{**_GEMMA_COMMON, "num_key_value_heads": 1}),
    "gemma2": lambda: T.Gemma2Config(
        num_hidden_layers=3,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=1.5,
        **_GEMMA_COMMON,
    ),
    "gemma3": lambda: T.Gemma3TextConfig(
        num_hidden_layers=3,
        sliding_window=5,
        query_pre_attn_scalar=24,
        layer_types=[SLIDING, FULL, SLIDING],
        rope_parameters={
            FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
            SLIDING: {"rope_type": "default", "rope_theta": 100.0},
        },
        **_GEMMA_COMMON,
    ),
    "llama": lambda: _hf_config("llama-a"),
    "mistral": lambda: _hf_config("mistral-a"),
    "qwen2": lambda: _hf_config("qwen2-a"),
    "phi": lambda: _hf_config("phi-a"),
}
SEQ_LEN, PROMPTS, CACHE_LEN = 20, (9, 5, 12), 32


def _random_params(config, rng):
    """Random float32 parameters in the layout of heads.abstract_params, drawn with numpy (an eager
    flax init compiles every op once: seconds per config): norm scales around their identity value,
    biases and reward head O(0.3), matrices O(0.15)."""
    shapes, _ = heads.abstract_params(config)

    def draw(path, s):
        name = path[-1].key
        if name == "scale":
            return (0.0 if config.norm_offset else 1.0) + 0.3 * rng.standard_normal(s.shape, np.float32)
        scale = 0.3 if name.endswith("bias") or name == "reward_head" else 0.15
        return scale * rng.standard_normal(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=1)
def _generate(params, config, prompt_NxP, steps_NxS, start_N):
    """Prefill the right-padded prompts, then feed one token per row per step at the row's own position."""
    n, p = prompt_NxP.shape
    cache = layers.init_cache(config, n, CACHE_LEN)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
    prefill, cache = heads.decode(params, config, prompt_NxP, positions, cache)

    def step(cache, xs):
        token_N, pos_N = xs
        logits, cache = heads.decode(params, config, token_N[:, None], pos_N[:, None], cache)
        return cache, logits[:, 0]

    pos_SxN = start_N[None] + jnp.arange(steps_NxS.shape[1], dtype=jnp.int32)[:, None]
    _, logits_SxNxV = jax.lax.scan(step, cache, (steps_NxS.T, pos_SxN))
    return prefill, jnp.moveaxis(logits_SxNxV, 0, 1)


@pytest.mark.parametrize("family", sorted(DECODE_CONFIGS))
def test_cached_decoding_equals_full_forward(family):
    config = families.from_hf(DECODE_CONFIGS[family]().to_dict())
    assert config.family == family
    params = _random_params(config, np.random.default_rng(sorted(DECODE_CONFIGS).index(family)))
    if SLIDING in config.layer_types:
        assert config.sliding_window < SEQ_LEN

    tokens = np.random.default_rng(3).integers(3, V, (len(PROMPTS), SEQ_LEN)).astype(np.int32)
    full = np.asarray(_logits(params, config, tokens, np.full(len(PROMPTS), SEQ_LEN - 1, np.int32)))
    p_max, n_steps = max(PROMPTS), SEQ_LEN - min(PROMPTS)
    prompt = np.full((len(PROMPTS), p_max), 7, np.int32)  # junk after each row's prompt: later overwritten
    steps = np.zeros((len(PROMPTS), n_steps), np.int32)
    for i, p in enumerate(PROMPTS):
        prompt[i, :p] = tokens[i, :p]
        steps[i, : SEQ_LEN - p] = tokens[i, p:]
    prefill, decoded = jax.tree.map(np.asarray, _generate(params, config, prompt, steps, np.array(PROMPTS, np.int32)))
    err = 0.0
    for i, p in enumerate(PROMPTS):
        err = max(
            err, np.abs(prefill[i, :p] - full[i, :p]).max(), np.abs(decoded[i, : SEQ_LEN - p] - full[i, p:]).max()
        )
    print(f"\n[decode] {family}: max |cached - full logit| = {err:.2e} (|logits| up to {np.abs(full).max():.1f})")
    assert err <= 1e-5, (family, err)
    assert np.abs(full).max() > 0.5


# ----------------------------------------------------------------------------- (4) preset sizes
PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "mistral-7b-v0.2": 7_241_732_096,  # v0.1's shapes: the window and rope base hold no parameters
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2-0.5b": 494_032_768,
    "qwen2-1.5b": 1_543_714_304,
    "qwen2-7b": 7_615_616_512,
    "phi-2": 2_779_683_840,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    config = PRESETS[name]
    shapes, _ = heads.abstract_params(config)
    # our tree also holds the D-parameter reward head, which the published LM sizes do not: exclude it
    assert shapes["reward_head"].shape == (config.hidden_size, 1)
    assert params_lib.param_count(shapes) - config.hidden_size == PUBLISHED[name]
    # independently: transformers builds the same architecture from our exported config (meta device:
    # nothing allocated), and our config survives the trip through transformers' config class
    hf_config = T.AutoConfig.for_model(**families.to_hf(config))
    # (scanned layers are haf_jax's parameter layout, not part of the HF architecture)
    assert families.from_hf(hf_config.to_dict()) == dataclasses.replace(config, scan_layers=False)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(hf_config)
    assert model.num_parameters() == PUBLISHED[name]


# mistralai/Mistral-7B-Instruct-v0.2's config.json as published on the hub (the architecture fields; the
# HaF-RM authors' `Mistral-7B-v02`): the preset must be what loading that file gives
MISTRAL_V02_CONFIG_JSON = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}


def test_mistral_v02_preset_is_the_published_config():
    loaded = families.from_hf(MISTRAL_V02_CONFIG_JSON)
    assert loaded == dataclasses.replace(PRESETS["mistral-7b-v0.2"], scan_layers=False)
    # and it is neither neighbour: v0.1 has a 4096 window and rope base 1e4, v0.3 a 32,768 vocabulary
    assert loaded != dataclasses.replace(PRESETS["mistral-7b"], scan_layers=False)
    assert loaded != dataclasses.replace(PRESETS["mistral-7b-v0.3"], scan_layers=False)


# ----------------------------------------------------------------------------- (5) model_type checks
def test_unknown_or_mismatched_model_type(tmp_path):
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(
        json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64})
    )
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt_neox'.*GPTNeoXForCausalLM.*llama"):
        hf.load_hf_config(tmp_path / "neox")

    llama = T.LlamaForCausalLM(_hf_config("llama-b"))
    llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
    gemma_config = families.from_hf(DECODE_CONFIGS["gemma"]().to_dict())
    with pytest.raises(ValueError, match=r"holds a llama checkpoint but the model config is gemma"):
        hf.load_params(tmp_path / "llama", gemma_config)
    llama_config, _ = hf.load_hf_config(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"holds a llama checkpoint but the model config is qwen2"):
        hf.load_params(tmp_path / "llama", dataclasses.replace(llama_config, family="qwen2", qkv_bias=True))
    # a scaling rule we do not implement is refused, not ignored
    with pytest.raises(ValueError, match=r"unsupported rope scaling type 'yarn'"):
        families.from_hf(
            {
                **families.to_hf(llama_config),
                "rope_parameters": None,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )
