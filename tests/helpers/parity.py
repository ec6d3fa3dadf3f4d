"""Helpers shared by the transformers parity tests (test_model_hf.py, test_model_families.py):
perturbed torch weights, right-padded token batches, the jitted haf_jax forward passes and the
transformers reference of one unpadded sequence."""

import functools

import jax
import numpy as np
import torch

from haf_jax.model import heads


def perturb(module, seed):
    """Adds noise to every weight (norms start at 0/1 and the reward head at 0, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 else 0.15))
    return module


@functools.partial(jax.jit, static_argnums=1)
def logits(params, config, tokens, last):
    return heads.full_logits(params, config, tokens, last)


@functools.partial(jax.jit, static_argnums=1)
def pairs(params, config, batch):
    return heads.forward_pairs(params, config, batch, chunk=16)


def right_padded(rng, lengths, width, *, high, pad, bos, eos):
    """[N, width] ids in [3, high) with BOS first and EOS last in each row, right-padded with `pad`."""
    tokens = np.full((len(lengths), width), pad, np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, high, n)
        tokens[i, 0], tokens[i, n - 1] = bos, eos
    return tokens


def pair_batch(rng, spec, width, *, high, pad, bos, eos):
    """spec: list of (prompt_len, chosen_len, rejected_len) -> right-padded [B, 2, width] batch."""
    tokens = np.full((len(spec), 2, width), pad, np.int32)
    resp = np.zeros((len(spec), 2, width), np.int32)
    last = np.zeros((len(spec), 2), np.int32)
    for b, (p, *responses) in enumerate(spec):
        prompt = rng.integers(3, high, p)
        prompt[0] = bos
        for j, r in enumerate(responses):
            seq = np.concatenate([prompt, rng.integers(3, high, r - 1), [eos]])
            tokens[b, j, : len(seq)] = seq
            resp[b, j, p : len(seq)] = 1
            last[b, j] = len(seq) - 1
    return {"tokens": tokens, "response_mask": resp, "last_index": last}


def hf_reference(seq, causal, tokens_1d, response_mask_1d):
    """(reward, summed response log-prob) from transformers on the unpadded sequence alone."""
    ids = torch.tensor(tokens_1d[None], dtype=torch.long)
    with torch.no_grad():
        reward = seq(input_ids=ids).logits[0, 0].item()
        out = causal(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(out, -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    return reward, float((logp * torch.tensor(response_mask_1d[1:], dtype=torch.float64)).sum())


def assert_params_equal(got, want, *, zero_reward_head=False):
    """Every leaf of `want` equals `got`'s at the same path (the reward head zero when a policy export
    dropped it); both trees have the same structure."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(want):
        value = got
        for k in path:
            value = value[k.key]
        expected = np.zeros_like(leaf) if (zero_reward_head and path[0].key == "reward_head") else leaf
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=str(path))
    assert jax.tree.structure(got) == jax.tree.structure(want)
