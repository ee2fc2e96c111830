"""Inference caches: what a cached decode step needs from the past, as a pytree.

Per sublayer of the stored *period* (the stack runs as ``lax.scan`` over repetitions of one period,
so every cache array carries the same leading ``repeats`` axis as the parameters):

* Mamba-1 / Mamba-2 -> `SSMCache`: ``conv (repeats, b, d_conv - 1, conv_dim)`` in the activation
  dtype (the last ``d_conv - 1`` inputs of the causal conv, oldest first) and ``ssm`` in float32:
  Mamba-2 ``(repeats, b, n_heads, head_dim, d_state)``, Mamba-1 ``(repeats, b, d_inner, d_state)``.
* attention -> `KVCache`: ``k, v (repeats, b, max_len, n_kv_heads, head_dim)`` preallocated, in the
  activation dtype, keys already rotated (RoPE). Slot ``j`` of row ``i`` is valid iff
  ``j < lengths[i]``; anything at or after ``lengths[i]`` is stale and never read.
* MLP / MoE -> ``None`` (no state).

`Cache` holds the per-period tuple and ``lengths (b,)`` int32: how many tokens each row has consumed,
which is the position of the next token (RoPE) and the KV slot it is written to. Every attention
layer of a row has seen the same tokens, so one ``lengths`` serves them all.

The single-token conv helpers used by both Mamba mixers live here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SSMCache:
    """A Mamba layer's state: conv window ``(..., b, k-1, c)`` and SSM state (float32)."""

    conv: jax.Array
    ssm: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """An attention layer's keys and values ``(..., b, max_len, n_kv_heads, head_dim)``."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """The whole model's cache: one entry per sublayer of the period (``None`` for MLP / MoE),
    stacked over repetitions, and the per-row token counts ``lengths (b,)`` int32."""

    layers: tuple[Any, ...]
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int | None:
        """KV capacity (``None`` for a model without attention: SSM state does not grow)."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[2]
        return None


def layer_cache_shapes(kind: str, sub_cfg, batch: int, max_len: int, dtype) -> Any:
    """`jax.ShapeDtypeStruct` cache of one sublayer (no repeats axis); ``None`` for MLP / MoE."""
    sds = jax.ShapeDtypeStruct
    if kind == "mamba2":
        c = sub_cfg
        return SSMCache(sds((batch, c.d_conv - 1, c.conv_dim), dtype),
                        sds((batch, c.n_heads, c.head_dim, c.d_state), jnp.float32))
    if kind == "mamba1":
        c = sub_cfg
        return SSMCache(sds((batch, c.d_conv - 1, c.d_inner), dtype), sds((batch, c.d_inner, c.d_state), jnp.float32))
    if kind == "attention":
        c = sub_cfg
        shape = (batch, max_len, c.n_kv_heads, c.head_dim)
        return KVCache(sds(shape, dtype), sds(shape, dtype))
    return None


def cache_shapes(cfg, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """The `Cache` of a `ModelConfig` as shape/dtype structs (leading repeats axis included)."""
    period = cfg.period
    repeats = cfg.n_layers // period

    def stack(s):
        return jax.ShapeDtypeStruct((repeats, *s.shape), s.dtype)

    layers = tuple(jax.tree.map(stack, layer_cache_shapes(kind, getattr(cfg, kind), batch, max_len, dtype))
                   for kind in cfg.layers[:period])
    return Cache(layers, jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An empty cache (zeros, ``lengths = 0``): decoding from it is generating from no prompt."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len, dtype))


def cache_bytes(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, int]:
    """Bytes of the cache by part: ``{"ssm", "conv", "kv"}``."""
    out = {"ssm": 0, "conv": 0, "kv": 0}
    for layer in cache_shapes(cfg, batch, max_len, dtype).layers:
        if isinstance(layer, SSMCache):
            out["ssm"] += layer.ssm.size * layer.ssm.dtype.itemsize
            out["conv"] += layer.conv.size * layer.conv.dtype.itemsize
        elif isinstance(layer, KVCache):
            out["kv"] += 2 * layer.k.size * layer.k.dtype.itemsize
    return out


# ------------------------------------------------------------------------- stacked-layer access

def layer_slice(a: jax.Array, layer) -> jax.Array:
    """``a[layer]`` for a cache array stacked over repetitions (``layer=None``: ``a`` itself)."""
    return a if layer is None else jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)


def layer_update(a: jax.Array, value: jax.Array, layer) -> jax.Array:
    """``a`` with ``a[layer] = value`` (``layer=None``: ``value``), as an in-place-able update."""
    value = value.astype(a.dtype)
    return value if layer is None else jax.lax.dynamic_update_index_in_dim(a, value, layer, 0)


# --------------------------------------------------------------------------------- conv helpers

def conv_window(x: jax.Array, lengths: jax.Array, k: int) -> jax.Array:
    """The causal conv's streaming window after each row's token ``lengths[i] - 1``.

    x ``(b, l, c)`` the conv inputs of a right-padded batch (real tokens at ``t < lengths[i]``).
    Returns ``(b, k-1, c)``: inputs ``lengths[i] - k + 1 .. lengths[i] - 1``, zeros before position 0.
    """
    b, l, c = x.shape
    xp = jnp.concatenate([jnp.zeros((b, k - 1, c), x.dtype), x], axis=1)  # index t + k - 1 holds x[t]
    return jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, k - 1, axis=0))(xp, lengths)


def conv_step(window: jax.Array, x: jax.Array, weight: jax.Array, bias: jax.Array | None):
    """One step of the causal depthwise conv (``jamba_jax.ops.causal_conv1d`` semantics).

    window ``(b, k-1, c)``, x ``(b, c)``, weight ``(k, c)`` (tap ``k-1`` on the current input), bias
    ``(c,)``. Returns ``y (b, c)`` in ``x.dtype`` (accumulated in float32) and the new window.
    """
    full = jnp.concatenate([window.astype(x.dtype), x[:, None]], axis=1)  # (b, k, c)
    y = jnp.sum(full.astype(jnp.float32) * weight.astype(jnp.float32), axis=1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), full[:, 1:]
