"""Small sequence ops shared by the Mamba mixers: causal depthwise conv1d and the gated RMSNorm.

Both respect packed sequences: ``segment_ids (b, l)`` marks documents; nothing crosses a boundary
(a change of id between neighbouring positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """``(b, l)`` bool, True where a new segment begins (position 0 included)."""
    first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """``(b, l)`` int32 positions that restart at 0 at every segment start."""
    l = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), segment_ids.shape)
    start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), idx, 0), axis=1)
    return idx - start


def causal_conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *,
                  segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None,
                  return_final_state: bool = False):
    """Causal depthwise conv: ``y[t, c] = bias[c] + sum_j weight[j, c] * x[t - (k-1) + j, c]``.

    Args:
      x: ``(b, l, c)``. weight: ``(k, c)`` (tap ``k-1`` multiplies the current step). bias: ``(c,)``.
      segment_ids: ``(b, l)``; taps reaching into an earlier segment see zeros.
      initial_state: ``(b, k-1, c)``, the inputs preceding ``x`` (a streaming window); it only
        feeds the row's first segment.
    Returns:
      ``y (b, l, c)`` in ``x.dtype`` and, with ``return_final_state``, the window ``(b, k-1, c)`` to
      continue the last segment: its last ``k-1`` inputs, zeros before that segment's start.
    """
    b, l, c = x.shape
    k = weight.shape[0]
    if weight.shape != (k, c):
        raise ValueError(f"causal_conv1d: weight must be (k, {c}), got {weight.shape}")
    if initial_state is None:
        initial_state = jnp.zeros((b, k - 1, c), x.dtype)
    elif initial_state.shape != (b, k - 1, c):
        raise ValueError(f"causal_conv1d: initial_state must be {(b, k - 1, c)}, got {initial_state.shape}")
    xp = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)  # (b, l + k - 1, c)
    if segment_ids is not None:
        # Document index of every padded position (the window counts as the first document).
        doc = jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1) - 1
        doc = jnp.concatenate([jnp.zeros((b, k - 1), jnp.int32), doc], axis=1)
    acc = jnp.zeros((b, l, c), jnp.float32)
    for j in range(k):
        tap = xp[:, j:j + l].astype(jnp.float32)
        if segment_ids is not None:
            same = doc[:, j:j + l] == doc[:, k - 1:]
            tap = jnp.where(same[..., None], tap, 0.0)
        acc = acc + tap * weight[j].astype(jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    y = acc.astype(x.dtype)
    if not return_final_state:
        return y
    final = xp[:, l:]
    if segment_ids is not None:
        final = jnp.where((doc[:, l:] == doc[:, -1:])[..., None], final, 0)
    return y, final


def gated_rms_norm(x: jax.Array, gate: jax.Array | None, weight: jax.Array, *, group_size: int,
                   eps: float) -> jax.Array:
    """Mamba-2's output norm: ``rmsnorm(x * silu(gate))`` per group of ``group_size`` channels.

    Args: x, gate ``(..., d)``; weight ``(d,)``. ``group_size = d_inner // n_groups`` (a full-width
    norm when ``n_groups == 1``). Computed in float32, returned in ``x.dtype``.
    """
    d = x.shape[-1]
    if d % group_size:
        raise ValueError(f"gated_rms_norm: group_size={group_size} must divide the width {d}")
    h = x.astype(jnp.float32)
    if gate is not None:
        h = h * jax.nn.silu(gate.astype(jnp.float32))
    h = h.reshape(*h.shape[:-1], d // group_size, group_size)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * h.reshape(*h.shape[:-2], d)).astype(x.dtype)
