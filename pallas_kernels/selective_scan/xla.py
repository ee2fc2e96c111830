"""Chunked selective scan in plain JAX / XLA, with chunk-sized memory (forward and backward).

The sequence is cut into chunks of ``chunk_size`` steps (padded at the end so any l works).
A ``lax.scan`` over chunks carries the (b, d, n) state; inside a chunk the linear recurrence

    state_t = decay_t * state_{t-1} + input_t,   decay_t = exp(delta_t A),  input_t = delta_t u_t B_t

is solved by ``lax.associative_scan`` over (decay, input) pairs and contracted with C right
away, so only (b, chunk, d, n) tensors are ever live.  The chunk body is wrapped in
``jax.checkpoint``: the backward pass stores only each chunk's inputs and carried state and
recomputes the (b, chunk, d, n) intermediates, one chunk at a time.

Shape letters: see ``reference.py``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .reference import (
    as_grouped,
    f32,
    initial_state_or_zeros,
    prepare_delta,
    segment_starts,
    skip_and_gate,
)

DEFAULT_CHUNK_SIZE = 64


def _combine(earlier, later):
    """Compose two affine steps s -> a*s + x (``earlier`` applied first)."""
    a1, x1 = earlier
    a2, x2 = later
    return a1 * a2, a2 * x1 + x2


def _per_channel_outer(x: jax.Array, BC: jax.Array) -> jax.Array:
    """x (b, T, d) times B (b, T, g, n) of each channel's group -> (b, T, d, n)."""
    b, T, d = x.shape
    g, n = BC.shape[2:]
    out = x.reshape(b, T, g, d // g, 1) * BC[:, :, :, None, :]
    return out.reshape(b, T, d, n)


def _contract_with_C(states: jax.Array, C: jax.Array) -> jax.Array:
    """sum_n states (b, T, d, n) * C (b, T, g, n) of each channel's group -> (b, T, d)."""
    b, T, d, n = states.shape
    g = C.shape[2]
    y = jnp.einsum(
        "btghn,btgn->btgh", states.reshape(b, T, g, d // g, n), C,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y.reshape(b, T, d)


@functools.partial(jax.checkpoint, prevent_cse=False)
def _chunk_step(A, state, chunk):
    """One chunk.  A (d, n); state (b, d, n); chunk = (u, delta (b, T, d), B, C (b, T, g, n),
    reset (b, T)).  Returns (state after the chunk (b, d, n), y (b, T, d))."""
    u, delta, B, C, reset = chunk
    decay = jnp.exp(delta[..., None] * A)                          # (b, T, d, n)
    decay = jnp.where(reset[:, :, None, None], 0.0, decay)         # segment start: forget
    inputs = _per_channel_outer(delta * u, B)                      # (b, T, d, n)
    decay_cum, input_cum = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
    states = decay_cum * state[:, None] + input_cum                # (b, T, d, n)
    return states[:, -1], _contract_with_C(states, C)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "chunk_size"))
def selective_scan_xla(
    u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, segment_ids=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Chunked selective scan; same arguments and results as ``selective_scan_reference``.

    Args:
      u, delta: (b, l, d).   A: (d, n).   B, C: (b, l, n) or (b, l, g, n).
      D, delta_bias: (d,) or None.   z: (b, l, d) or None.
      initial_state: (b, d, n) or None (zeros).   segment_ids: (b, l) int or None.
      chunk_size: steps per chunk (live memory ~ a few b * chunk_size * d * n float32);
        clipped to l for short sequences.

    Returns:
      y: (b, l, d) in u's dtype, final_state: (b, d, n) float32.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, found {chunk_size!r}")
    b, l, d = u.shape
    n = A.shape[-1]
    T = max(1, min(chunk_size, l))
    num_chunks = math.ceil(l / T)
    pad = num_chunks * T - l

    # Padded steps have delta = 0 (decay exp(0) = 1, input 0) and no reset, so they carry
    # the state through unchanged.  delta is padded *after* bias / softplus for that reason.
    def to_chunks(x):  # (b, l, ...) -> (num_chunks, b, T, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, num_chunks, T, *x.shape[2:]), 1, 0)

    delta = prepare_delta(delta, delta_bias, delta_softplus)
    resets = segment_starts(segment_ids, b, l)
    chunks = tuple(
        to_chunks(x) for x in (u.astype(f32), delta, as_grouped(B), as_grouped(C), resets)
    )
    A = A.astype(f32)
    final_state, y = jax.lax.scan(
        lambda state, chunk: _chunk_step(A, state, chunk),
        initial_state_or_zeros(initial_state, b, d, n),
        chunks,
    )
    y = jnp.moveaxis(y, 0, 1).reshape(b, num_chunks * T, d)[:, :l]   # (b, l, d)
    y = skip_and_gate(y, u, D, z)
    return y.astype(u.dtype), final_state
