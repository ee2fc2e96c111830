"""Causal grouped-query self-attention with optional (partial) RoPE and packed-sequence support.

The layer is split so a cached decode step can reuse the pieces: ``qkv`` (projections + RoPE),
``attend`` (the attention core: XLA via ``jax.nn.dot_product_attention``, cuDNN flash attention on
GPUs, Pallas splash attention on TPUs) and ``out`` (output projection). ``__call__`` is
``out(attend(*qkv(x)))``.

Shapes: ``b`` batch, ``l`` length, ``h`` query heads, ``g`` kv heads, ``d`` head dim.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from flax import nnx

from jamba_jax.cache import KVCache
from jamba_jax.config import AttentionConfig
from jamba_jax.layers.common import dense, logical_sharding
from jamba_jax.ops import segment_starts

log = logging.getLogger("jamba_jax")

AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "splash")
#: What ``impl="auto"`` means on a GPU; set it to ``"xla"`` (before tracing) to keep cuDNN out.
GPU_AUTO_IMPL = "cudnn"


# ----------------------------------------------------------------------------------------------- RoPE

def rotary_dim(cfg: AttentionConfig) -> int:
    """Number of leading head dims that RoPE rotates (0 without RoPE)."""
    return 0 if cfg.rope is None else int(cfg.head_dim * cfg.rope.fraction)


def rope_cos_sin(positions: jax.Array, rot_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``(b, l, rot_dim // 2)`` (float32) for integer ``positions (b, l)``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x (b, l, heads, d)``; the rest pass through.

    Half-split ("rotate_half") convention as in transformers' Llama/Bamba: dim ``i`` pairs with
    ``i + rot_dim / 2``. Computed in float32, returned in ``x.dtype``.
    """
    half = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------------------ attention cores

def _document_ids(segment_ids: jax.Array) -> jax.Array:
    """Renumber segments as runs (``0, 1, ...`` per row): a new document starts wherever the id
    changes, as in ``jamba_jax.ops``; a repeated id after a different one is a new document."""
    return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                  scale: float | None = None) -> jax.Array:
    """Causal GQA through ``jax.nn.dot_product_attention`` with XLA (cuDNN is `cudnn_attention`).

    q ``(b, l, h, d)``, k/v ``(b, l, g, d)`` with ``h % g == 0``; ``segment_ids (b, l)`` restricts
    attention to the same document; ``scale`` multiplies the scores (None: ``1/sqrt(d)``).
    Returns ``(b, l, h, d)``.
    """
    mask = None
    if segment_ids is not None:
        doc = _document_ids(segment_ids)
        mask = (doc[:, :, None] == doc[:, None, :])[:, None]  # (b, 1, l, l)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation=None)


def _cudnn_supported(q: jax.Array, k: jax.Array) -> bool:
    """Shapes and dtypes cuDNN's flash attention takes (the rest is checked when tracing)."""
    d = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and d == k.shape[-1]
            and d % 8 == 0 and d <= 256)


def blockwise_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                               block_q: int = 512, scale: float | None = None) -> jax.Array:
    """``xla_attention`` with document masking, ``block_q`` queries at a time.

    Each block sees all keys under a causal-and-same-document mask and is rematerialised in the
    backward pass, so at most one block's ``(b, h, block_q, l)`` scores exist at once instead of the
    whole ``(b, h, l, l)``. Same contract as ``xla_attention``; ``l`` not a multiple of the block
    is padded at the end (padded queries are dropped).
    """
    b, l, h, d = q.shape
    block_q = min(block_q, l)
    nb = -(-l // block_q)
    lp = nb * block_q
    doc = _document_ids(segment_ids)
    qp = jnp.pad(q, [(0, 0), (0, lp - l), (0, 0), (0, 0)])
    q_blocks = qp.reshape(b, nb, block_q, h, d).swapaxes(0, 1)  # (nb, b, block_q, h, d)
    q_doc = jnp.pad(doc, [(0, 0), (0, lp - l)], mode="edge").reshape(b, nb, block_q).swapaxes(0, 1)
    q_pos = jnp.arange(lp, dtype=jnp.int32).reshape(nb, block_q)
    k_pos = jnp.arange(l, dtype=jnp.int32)

    @jax.checkpoint
    def one(args):
        qb, qd, qpos = args
        mask = (qd[:, :, None] == doc[:, None, :]) & (qpos[:, None] >= k_pos[None, :])[None]
        return jax.nn.dot_product_attention(qb, k, v, mask=mask[:, None], scale=scale, implementation="xla")

    out = jax.lax.map(one, (q_blocks, q_doc, q_pos))  # (nb, b, block_q, h, d)
    return out.swapaxes(0, 1).reshape(b, lp, h, d)[:, :l]


def _flash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")


def _cudnn_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                 scale: float | None = None) -> jax.Array:
    """cuDNN on arrays of one device: a ``lax.cond`` sends rows that are not all one document to
    `blockwise_masked_attention` (cuDNN's causal kernel takes no document mask)."""
    if segment_ids is None:
        return _flash(q, k, v, scale)
    one_document = jnp.all(segment_ids == segment_ids[:, :1])
    return jax.lax.cond(one_document, lambda: _flash(q, k, v, scale),
                        lambda: blockwise_masked_attention(q, k, v, segment_ids, scale=scale).astype(q.dtype))


#: Logical axes of attention's operands (``(b, l, heads, head_dim)``), for `per_device`.
Q_AXES, KV_AXES = ("batch", None, "heads", None), ("batch", None, "kv_heads", None)


def per_device(attention, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None):
    """``attention(q, k, v, segment_ids)`` on each device's rows and heads under a trainer's mesh
    (`jamba_jax.layers.common.activation_sharding`), called directly outside one.

    cuDNN attention's own partitioner needs q, k and v sharded alike and refuses what XLA's
    propagation gives it in the backward pass; inside ``shard_map`` there is nothing to partition.
    Returns None where the logical-axis table places q and k/v differently (a tensor axis that
    divides the query heads but not the kv heads): the caller then takes another path.
    """
    q_sharding, kv_sharding = logical_sharding(q, Q_AXES), logical_sharding(k, KV_AXES)
    if q_sharding is None:
        return attention(q, k, v, segment_ids)
    spec = q_sharding.spec
    if spec != kv_sharding.spec:
        return None
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: attention(q, k, v, None), mesh=q_sharding.mesh,
                             in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(attention, mesh=q_sharding.mesh, in_specs=(spec,) * 3 + (P(spec[0], None),),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


_warned: set[str] = set()


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                    scale: float | None = None) -> jax.Array:
    """Causal GQA through cuDNN flash attention (GPU), same contract as ``xla_attention``.

    Packed rows (``segment_ids`` not constant along a row) take `blockwise_masked_attention`; under
    a trainer's mesh each device runs its own shard (`per_device`). Inputs cuDNN cannot take
    (float32, head dims over 256 or not a multiple of 8, no cuDNN) or cannot be placed alike go to
    ``xla_attention`` instead.
    """
    if _cudnn_supported(q, k):
        try:
            jax.eval_shape(_flash, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)))  # cuDNN's checks
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
            if str(e) not in _warned:
                _warned.add(str(e))
                log.warning("cuDNN attention unavailable (%s): using XLA attention", e)
        else:
            out = per_device(functools.partial(_cudnn_local, scale=scale), q, k, v, segment_ids)
            if out is not None:
                return out
    return xla_attention(q, k, v, segment_ids, scale=scale)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                     max_block: int = 512, interpret=None, scale: float | None = None) -> jax.Array:
    """Causal GQA through Pallas splash attention (TPU), same contract as ``xla_attention``.

    ``l`` is padded at the end to a multiple of the block (``min(max_block, round_up(l, 128))``);
    causality keeps real queries off the padding. ``interpret``: ``None`` means interpret mode
    everywhere but on TPU (for tests); ``True`` or a ``pltpu.InterpretParams`` force it. Not
    sharding-aware: under a multi-device mesh, call it inside ``shard_map`` over batch/heads.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    b, l, h, d = q.shape
    if max_block % 128:
        raise ValueError(f"splash_attention: max_block={max_block} must be a multiple of 128")
    block = min(max_block, _round_up(l, 128))
    lp = _round_up(l, block)
    pad = [(0, 0), (0, lp - l), (0, 0), (0, 0)]
    # splash applies no softmax scale; (b, l, heads, d) -> (b, heads, lp, d)
    q = jnp.pad(q * jnp.asarray(d ** -0.5 if scale is None else scale, q.dtype), pad).transpose(0, 2, 1, 3)
    k = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    v = jnp.pad(v, pad).transpose(0, 2, 1, 3)

    mask = sa.MultiHeadMask([sa.CausalMask((lp, lp)) for _ in range(h)])
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        doc = jnp.pad(_document_ids(segment_ids), [(0, 0), (0, lp - l)], mode="edge")
        out = jax.vmap(kernel)(q, k, v, sa.SegmentIds(q=doc, kv=doc))
    return out.transpose(0, 2, 1, 3)[:, :l]


def resolve_impl(impl: str) -> str:
    """``"auto"`` -> ``"splash"`` on TPU, `GPU_AUTO_IMPL` (``"cudnn"``) on GPU, ``"xla"`` elsewhere."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl == "auto":
        backend = jax.default_backend()
        if backend == "tpu":
            return "splash"
        return GPU_AUTO_IMPL if backend in ("gpu", "cuda", "rocm") else "xla"
    return impl


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_lengths: jax.Array, *,
                     scale: float | None = None) -> jax.Array:
    """One query per row against a KV cache (a decode step).

    q ``(b, h, d)``; k_cache/v_cache ``(b, L, g, d)`` of which row ``i`` attends to slots
    ``< kv_lengths[i]`` (its own key included; ``kv_lengths >= 1``). Scale ``1/sqrt(d)`` unless given, scores
    and softmax in float32, products in the cache dtype with float32 accumulation. Returns ``(b, h, d)``.
    """
    b, h, d = q.shape
    g = k_cache.shape[2]
    f32 = jnp.float32
    qg = q.astype(k_cache.dtype).reshape(b, g, h // g, d)
    s = jnp.einsum("bgrd,blgd->bgrl", qg, k_cache, preferred_element_type=f32) * (d ** -0.5 if scale is None else scale)
    valid = jnp.arange(k_cache.shape[1])[None, :] < kv_lengths[:, None]  # (b, L)
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bgrl,blgd->bgrd", p.astype(v_cache.dtype), v_cache, preferred_element_type=f32)
    return o.reshape(b, h, d).astype(q.dtype)


# ------------------------------------------------------------------------------------------- module

class Attention(nnx.Module):
    """Causal GQA self-attention, ``(b, l, d_model) -> (b, l, d_model)``, scores times
    ``cfg.softmax_scale`` (``1/sqrt(head_dim)`` unless the config sets one).

    Parameters (kernels ``(in, out)``): ``q_proj`` ``(d_model, h*d)`` ('embed', 'heads'),
    ``k_proj``/``v_proj`` ``(d_model, g*d)`` ('embed', 'kv_heads'), ``o_proj`` ``(h*d, d_model)``
    ('heads', 'embed'). Head ``i`` is columns ``[i*d, (i+1)*d)``; query head ``i`` uses kv head
    ``i // (h // g)`` (transformers' ``repeat_kv`` order).

    ``impl``: ``"auto"`` (splash on TPU, cuDNN on GPU, else XLA), ``"xla"``, ``"cudnn"`` or ``"splash"``;
    ``splash_block`` caps the splash block size; ``interpret`` is passed to splash (``None``: auto).
    """

    def __init__(self, cfg: AttentionConfig, d_model: int, *, impl: AttentionImpl = "auto",
                 splash_block: int = 512, interpret=None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        resolve_impl(impl)  # validate early
        rot = rotary_dim(cfg)
        if cfg.rope is not None and (rot < 2 or rot % 2):
            raise ValueError(f"invalid config: attention.rope.fraction={cfg.rope.fraction!r}: "
                             f"head_dim * fraction = {rot} rotary dims, must be even and >= 2")
        self.cfg = cfg
        self.d_model = d_model
        self.impl = impl
        self.splash_block = splash_block
        self.interpret = interpret
        self.dtype = dtype
        h, g, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d_model, h * d, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = dense(d_model, g * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = dense(d_model, g * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = dense(h * d, d_model, ("heads", "embed"), bias=cfg.out_bias, **kw)

    def qkv(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projections and RoPE. x ``(b, l, d_model)``, positions ``(b, l)`` int (default ``arange(l)``).

        Returns q ``(b, l, h, d)`` and k, v ``(b, l, g, d)``; q and k already rotated, so a KV cache
        stores these k, v as they are.
        """
        b, l, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).reshape(b, l, cfg.n_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
        if cfg.rope is not None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
            cos, sin = rope_cos_sin(positions, rotary_dim(cfg), cfg.rope.theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
               impl: AttentionImpl | None = None) -> jax.Array:
        """Causal self-attention core: q ``(b, l, h, d)``, k/v ``(b, l, g, d)`` -> ``(b, l, h, d)``.

        ``segment_ids (b, l)``: attention stays within a run of equal ids. ``impl`` overrides the
        module's. (Cached decoding, with fewer queries than keys, is `decode_step`.)
        """
        resolved = resolve_impl(impl or self.impl)
        scale = self.cfg.softmax_scale
        if resolved == "splash":
            return splash_attention(q, k, v, segment_ids, max_block=self.splash_block, interpret=self.interpret,
                                    scale=scale)
        if resolved == "cudnn":
            return cudnn_attention(q, k, v, segment_ids, scale=scale)
        return xla_attention(q, k, v, segment_ids, scale=scale)

    def out(self, o: jax.Array) -> jax.Array:
        """Output projection: ``(b, l, h, d) -> (b, l, d_model)``."""
        b, l = o.shape[:2]
        return self.o_proj(o.reshape(b, l, self.cfg.n_heads * self.cfg.head_dim))

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, impl: AttentionImpl | None = None) -> jax.Array:
        """x ``(b, l, d_model)`` -> ``(b, l, d_model)``. With packing, pass ``segment_ids (b, l)`` and
        ``positions (b, l)`` restarting at each segment (``jamba_jax.ops.positions_from_segments``)."""
        q, k, v = self.qkv(x, positions)
        return self.out(self.attend(q, k, v, segment_ids, impl=impl))

    # ------------------------------------------------------------------------- cached inference

    def prefill(self, x: jax.Array, max_len: int) -> tuple[jax.Array, KVCache]:
        """Causal attention over a (right-padded) batch at positions ``0..l-1``, and its keys/values
        in a ``KVCache`` of capacity ``max_len``. Real tokens never see the padding after them, so
        outputs at real positions equal ``__call__``'s; slots at or after a row's length are stale."""
        b, l, _ = x.shape
        if max_len < l:
            raise ValueError(f"attention prefill: max_len={max_len} is shorter than the prompt ({l})")
        q, k, v = self.qkv(x)
        y = self.out(self.attend(q, k, v))
        pad = [(0, 0), (0, max_len - l), (0, 0), (0, 0)]
        return y, KVCache(jnp.pad(k, pad), jnp.pad(v, pad))

    def decode_step(self, x: jax.Array, cache: KVCache, lengths: jax.Array):
        """One token per row at position ``lengths[i]``: x ``(b, 1, d_model)`` ->
        ``(y (b, 1, d_model), new cache)``.

        The new key/value are scattered into slot ``lengths[i]`` first and attention then reads the
        updated cache (slots ``<= lengths[i]``), so under ``jit`` the write happens in place.
        """
        b = x.shape[0]
        q, k, v = self.qkv(x, lengths[:, None])
        idx = (jnp.arange(b), lengths)
        keys = cache.k.at[idx].set(k[:, 0].astype(cache.k.dtype))
        values = cache.v.at[idx].set(v[:, 0].astype(cache.v.dtype))
        o = cached_attention(q[:, 0], keys, values, lengths + 1, scale=self.cfg.softmax_scale)
        return self.out(o[:, None]), KVCache(keys, values)
