"""Attention kernels behind one function: `attend`, with the implementation picked by `choose`.

Config key model.attention (ModelConfig.attention):
  "xla"    einsum + softmax written out here: runs everywhere, every option (the reference).
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on GPU.
  "splash" Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) on TPU.
  "auto"   (default) splash on TPU, cudnn on GPU, xla elsewhere.
An implementation that cannot run the layer's options falls back to "xla", and the reason is
logged once (logger "haf_jax"): e.g. cuDNN has no logit soft-cap (Gemma 2) and no float32, and
needs head dims that are multiples of 8 up to 128 (256 from Hopper on); splash needs lengths that
are multiples of its 128-token blocks; neither serves KV-cache decoding. Splash on a non-TPU
backend runs in Pallas interpret mode (for tests; slow).

Masking is the same for all: query i attends key j when both lie in the same segment
(`segment ids`, 0 = padding, its own segment), or j lies in the shared prompt of i's segment (see
below), and j's position is not after i's (and, in a sliding layer, within `window` positions).
Rows are laid out in order inside each segment, so position order is index order and the
kernels' causal masks by index are the same rule.

Shared prompts (data.share_prompt, data/packing.py): the chosen and rejected sequences of pair
slot k are segments 2k + 1 and 2k + 2, and the prompt they share (but its last token, which each
sequence repeats at its start) is segment -(k + 1), before them in the row. A sequence's queries
also attend the keys of its pair's shared prompt: `visible_segment` below. The prompt is run once
for both responses; each response sees exactly the keys (prompt, own tokens) and positions it
would see in a row of its own. Splash's segment ids express equality only, so rows with shared
prompts run the XLA kernel on TPU (`for_shared_prompt`); cuDNN takes the rule as its mask.

Shapes: N rows, L queries, S keys, Q query heads, K key/value heads (G = Q // K), H head width.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from haf_jax.core.sharding import spec_for
from haf_jax.model.config import ATTENTIONS as IMPLEMENTATIONS

NEG_INF = -2.3819763e38  # large finite negative: fully masked rows can never produce NaN
SPLASH_BLOCK = 128  # splash's query / key block; lengths must be multiples of it
QUERY_BLOCKS = 8  # the XLA path's causal query blocks (xla_attention)
MIN_QUERY_BLOCK = 32

_log = logging.getLogger("haf_jax")
_logged: set = set()


def default_implementation(platform: str) -> str:
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def choose(
    requested: str,
    *,
    platform: str,
    dtype,
    head_dim: int,
    length: int,
    softcap,
    cached: bool,
    gpu_capability: str | None = None,
) -> tuple[str, str | None]:
    """(implementation to run, reason it is not the requested one or None): pure, no device needed.

    `platform`: "cpu" | "gpu" | "tpu"; `length`: query length (= key length without a cache);
    `gpu_capability`: the GPU's compute capability, e.g. "9.0" (None: assume pre-Hopper limits).
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={requested!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    impl = default_implementation(platform) if requested == "auto" else requested
    if impl == "xla":
        return "xla", None
    if cached:  # decoding is XLA's job; only an explicit request hears about it
        return "xla", None if requested == "auto" else f"{impl} does not serve KV-cache decoding"
    if impl == "cudnn":
        if platform not in ("gpu", "cuda"):
            return "xla", f"cudnn needs a GPU (platform {platform})"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return "xla", f"cudnn runs bfloat16/float16 only, not {jnp.dtype(dtype).name}"
        if softcap:
            return "xla", "cudnn has no attention logit soft-cap"
        h_max = 256 if gpu_capability and float(gpu_capability) >= 9.0 else 128
        if head_dim % 8 or head_dim > h_max:
            return "xla", f"cudnn needs a head dim that is a multiple of 8 up to {h_max}, not {head_dim}"
        if length % 2:
            return "xla", f"cudnn with a mask needs an even length, not {length}"
        return "cudnn", None
    if length % SPLASH_BLOCK:
        return "xla", f"splash needs a length that is a multiple of {SPLASH_BLOCK}, not {length}"
    return "splash", None


def _warn_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        _log.warning("%s", message)


def _target() -> tuple[str, str | None]:
    """(platform the step is compiled for, GPU compute capability or None): the context mesh's
    devices when traced under one (also an ahead-of-time TPU topology), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    capability = None
    if platform in ("gpu", "cuda") and jax.default_backend() == platform:
        capability = getattr(jax.devices()[0], "compute_capability", None)
    return platform, capability


def attend(
    query_NxLxQxH,
    key_NxSxKxH,
    value_NxSxKxH,
    *,
    q_pos_NxL,
    k_pos_NxS,
    q_seg_NxL,
    k_seg_NxS,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    implementation: str = "auto",
    cached: bool = False,
):
    """Masked multi-/grouped-query attention -> [N, L, Q, H] in the query's dtype (module docstring).

    `window`: a sliding layer's width (key positions > query position - window), None = global.
    `cached`: keys come from a KV cache (decoding): always the XLA path.
    """
    platform, capability = _target()
    impl, reason = choose(
        implementation,
        platform=platform,
        dtype=query_NxLxQxH.dtype,
        head_dim=query_NxLxQxH.shape[-1],
        length=query_NxLxQxH.shape[1],
        softcap=softcap,
        cached=cached,
        gpu_capability=capability,
    )
    if reason is not None:
        label = implementation if implementation != "auto" else f"auto ({default_implementation(platform)})"
        _warn_once(f"model.attention={label}: using xla attention instead ({reason})")
    if impl == "splash" and platform != "tpu":
        _warn_once(f"model.attention=splash on {platform}: Pallas interpret mode (correct but slow; for tests)")
    args = (query_NxLxQxH, key_NxSxKxH, value_NxSxKxH)
    if impl == "cudnn":
        return cudnn_attention(
            *args,
            q_pos_NxL=q_pos_NxL,
            k_pos_NxS=k_pos_NxS,
            q_seg_NxL=q_seg_NxL,
            k_seg_NxS=k_seg_NxS,
            scale=scale,
            window=window,
        )
    if impl == "splash":
        return splash_attention(
            *args,
            q_seg_NxL=q_seg_NxL,
            k_seg_NxS=k_seg_NxS,
            scale=scale,
            softcap=softcap,
            window=window,
            interpret=platform != "tpu",
        )
    return xla_attention(
        *args,
        q_pos_NxL=q_pos_NxL,
        k_pos_NxS=k_pos_NxS,
        q_seg_NxL=q_seg_NxL,
        k_seg_NxS=k_seg_NxS,
        scale=scale,
        softcap=softcap,
        window=window,
        causal=not cached,
    )


def for_shared_prompt(config):
    """`config` for rows with shared prompts: an attention request that resolves to splash (whose
    segment ids are equality only) becomes "xla", with the reason logged once."""
    platform, _ = _target()
    resolved = default_implementation(platform) if config.attention == "auto" else config.attention
    if resolved != "splash":
        return config
    _warn_once(
        f"model.attention={config.attention}: using xla attention for rows with shared prompts "
        f"(data.share_prompt): splash's segment ids cannot let two sequences see one prompt"
    )
    return dataclasses.replace(config, attention="xla")


def visible_segment(q_seg_NxL, k_seg_NxS):
    """bool [N, L, S]: key segment equals the query's, or is the shared prompt of the query's pair
    (module docstring: sequence 2k + 1 or 2k + 2 sees prompt -(k + 1)); padding (0) sees only itself."""
    q, k = q_seg_NxL[:, :, None], k_seg_NxS[:, None, :]
    return (k == q) | ((q > 0) & (k == -((q + 1) // 2)))


def allowed_mask(q_pos_NxL, k_pos_NxS, q_seg_NxL, k_seg_NxS, window: int | None = None):
    """bool [N, L, S]: visible segment, key position not after the query's, within the window."""
    q_pos, k_pos = q_pos_NxL[:, :, None], k_pos_NxS[:, None, :]
    allowed = (k_pos <= q_pos) & visible_segment(q_seg_NxL, k_seg_NxS)
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[(start, stop)]: the XLA path's causal query blocks, at most QUERY_BLOCKS of at least
    MIN_QUERY_BLOCK queries each (one block = the dense kernel)."""
    count = max(1, min(QUERY_BLOCKS, length // MIN_QUERY_BLOCK))
    bounds = [round(i * length / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def xla_attention(
    query_NxLxQxH,
    key_NxSxKxH,
    value_NxSxKxH,
    *,
    q_pos_NxL,
    k_pos_NxS,
    q_seg_NxL,
    k_seg_NxS,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    causal: bool = False,
):
    """The reference kernel (`dense_attention`), run in causal query blocks when `causal`.

    `causal`: the keys are the queries' own row (no KV cache), where no query is ever allowed a key
    after it by index (module docstring: position order is index order inside a segment, and a
    shared prompt comes before its sequences). Query block [a, b) then only needs keys [0, b): the
    blocks skip the upper triangle (8 blocks: 56% of the logits), and their [.., block, b] logits
    stay in cache where the whole [.., L, S] did not. Measured on a 2-core CPU (Gemma heads 8 x 64,
    float32): the attention alone, forward + backward, 2.5-3x faster at L = 256 to 1024; a whole
    Baseline step of issue 12's 6 x 512 model 1.44x faster at L = 1024 (1.01x at 256, where the
    MLP dominates).
    """
    blocks = query_blocks(query_NxLxQxH.shape[1]) if causal else []
    kw = dict(scale=scale, softcap=softcap, window=window)
    if len(blocks) < 2:
        return dense_attention(
            query_NxLxQxH,
            key_NxSxKxH,
            value_NxSxKxH,
            q_pos_NxL=q_pos_NxL,
            k_pos_NxS=k_pos_NxS,
            q_seg_NxL=q_seg_NxL,
            k_seg_NxS=k_seg_NxS,
            **kw,
        )
    outs = [
        dense_attention(
            query_NxLxQxH[:, a:b],
            key_NxSxKxH[:, :b],
            value_NxSxKxH[:, :b],
            q_pos_NxL=q_pos_NxL[:, a:b],
            k_pos_NxS=k_pos_NxS[:, :b],
            q_seg_NxL=q_seg_NxL[:, a:b],
            k_seg_NxS=k_seg_NxS[:, :b],
            **kw,
        )
        for a, b in blocks
    ]
    return jnp.concatenate(outs, axis=1)


def dense_attention(
    query_NxLxQxH,
    key_NxSxKxH,
    value_NxSxKxH,
    *,
    q_pos_NxL,
    k_pos_NxS,
    q_seg_NxL,
    k_seg_NxS,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
):
    """All queries against all keys: float32 logits [N, K, L x G, S], masked, softmax, weighted values.

    The query heads sharing a key/value head are folded into the query axis (L x G rows per key
    head) and both matmuls keep the natural output order of a batched matmul ([N, K] batch, then
    rows, then columns). With one key/value head (MQA) every reshape is free, and the softmax and
    both products (and their gradients) run without a transposed copy of the [.., L x G, S] logits.
    """
    n, length, q, h = query_NxLxQxH.shape
    s, k = key_NxSxKxH.shape[1], key_NxSxKxH.shape[2]
    g = q // k
    dt = query_NxLxQxH.dtype
    query = jnp.swapaxes(query_NxLxQxH.reshape(n, length, k, g, h), 1, 2).reshape(n, k, length * g, h)
    key, value = jnp.swapaxes(key_NxSxKxH, 1, 2), jnp.swapaxes(value_NxSxKxH, 1, 2)  # [N, K, S, H]
    logits = jnp.einsum("nkmh,nksh->nkms", query, key, preferred_element_type=jnp.float32)
    logits = logits.reshape(n, k, length, g, s) * scale
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    allowed = allowed_mask(q_pos_NxL, k_pos_NxS, q_seg_NxL, k_seg_NxS, window)
    logits = jnp.where(allowed[:, None, :, None, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt).reshape(n, k, length * g, s)
    out = jnp.einsum("nkms,nksh->nkmh", probs, value)
    return jnp.swapaxes(out.reshape(n, k, length, g, h), 1, 2).reshape(n, length, q, h)


def cudnn_attention(
    query_NxLxQxH,
    key_NxSxKxH,
    value_NxSxKxH,
    *,
    q_pos_NxL,
    k_pos_NxS,
    q_seg_NxL,
    k_seg_NxS,
    scale: float,
    window: int | None = None,
    implementation: str = "cudnn",
):
    """cuDNN flash attention: causal (by index) and the whole rule (`allowed_mask`) as its boolean
    mask. The sliding window is in that mask, by position: cuDNN's own left window counts indices,
    and a rejected response's distance to its shared prompt is longer in the row than in positions.
    `implementation="xla"` runs the same call through JAX's reference implementation (tests, no GPU)."""
    allowed = allowed_mask(q_pos_NxL, k_pos_NxS, q_seg_NxL, k_seg_NxS, window)[:, None]  # [N, 1, L, S]
    return jax.nn.dot_product_attention(
        query_NxLxQxH,
        key_NxSxKxH,
        value_NxSxKxH,
        mask=allowed,
        scale=scale,
        is_causal=True,
        implementation=implementation,
    )


def _splash_kernel(heads: int, length: int, keys: int, window: int | None, softcap: float | None, interpret: bool):
    """A single-device MQA splash kernel over `heads` query heads sharing one key/value head (built
    at every trace: it holds arrays made under the trace, so it cannot be cached across traces)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
        splash_attention_mask as mask_lib,
    )

    shape = (length, keys)
    if window is None:
        mask = mask_lib.CausalMask(shape)
    else:  # keys i - window + 1 .. i
        mask = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    block = min(SPLASH_BLOCK, length)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return kernel_lib.make_splash_mqa_single_device(
        mask_lib.MultiHeadMask([mask] * heads), block_sizes=sizes, attn_logits_soft_cap=softcap, interpret=interpret
    )


def splash_attention(
    query_NxLxQxH,
    key_NxSxKxH,
    value_NxSxKxH,
    *,
    q_seg_NxL,
    k_seg_NxS,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    interpret: bool = False,
):
    """Pallas splash attention: one MQA kernel per key/value head (its G query heads), vmapped
    over rows and key/value heads, with segment ids; the scale is folded into the queries (the
    soft-cap then applies to the scaled logits, as in the XLA path). Under a mesh, the rows are
    split over the batch axes with shard_map (a Pallas call is not partitioned automatically)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    n, length, q, h = query_NxLxQxH.shape
    s, k = key_NxSxKxH.shape[1], key_NxSxKxH.shape[2]
    kernel = _splash_kernel(q // k, length, s, window, float(softcap) if softcap else None, interpret)

    def local(query, key, value, q_seg, k_seg):
        rows = query.shape[0]
        query = (query * jnp.asarray(scale, query.dtype)).reshape(rows, length, k, q // k, h)
        query = jnp.transpose(query, (0, 2, 3, 1, 4))  # [n, K, G, L, H]
        key, value = jnp.transpose(key, (0, 2, 1, 3)), jnp.transpose(value, (0, 2, 1, 3))  # [n, K, S, H]

        def one_row(q_KxGxLxH, k_KxSxH, v_KxSxH, qs_L, ks_S):
            ids = kernel_lib.SegmentIds(q=qs_L, kv=ks_S)
            return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(q_KxGxLxH, k_KxSxH, v_KxSxH)

        out = jax.vmap(one_row)(query, key, value, q_seg, k_seg)  # [n, K, G, L, H]
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(rows, length, q, h)

    mesh = jax.sharding.get_abstract_mesh()
    args = (query_NxLxQxH, key_NxSxKxH, value_NxSxKxH, q_seg_NxL.astype(jnp.int32), k_seg_NxS.astype(jnp.int32))
    if mesh.empty:
        return local(*args)
    specs = tuple(spec_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh) for x in args)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)
