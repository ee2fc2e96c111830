"""Ground truth for the Mamba-1 selective scan: one sequential ``lax.scan`` over time.

Shape letters used throughout this package (channels last):

    b  batch            l  sequence length      d  channels (Mamba's d_inner)
    n  state size       g  groups of B / C      h = d // g channels per group

Channel ``i`` reads the B / C of group ``i // h``; B / C given as (b, l, n) are one group.

This file also holds the small prologue / epilogue helpers that every backend shares
(delta preprocessing, segment resets, the D skip and z gate), so that the backends only
differ in how they run the recurrence.  All math here is float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

f32 = jnp.float32


# --------------------------------------------------------------------------- helpers
def as_grouped(x: jax.Array) -> jax.Array:
    """(b, l, n) or (b, l, g, n) -> (b, l, g, n) float32 (a missing group axis is g = 1)."""
    x = x.astype(f32)
    return x[:, :, None, :] if x.ndim == 3 else x


def prepare_delta(delta: jax.Array, delta_bias: jax.Array | None, delta_softplus: bool) -> jax.Array:
    """(b, l, d) -> float32 (b, l, d): ``softplus(delta + delta_bias)`` (each step optional)."""
    delta = delta.astype(f32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(f32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


def segment_starts(segment_ids: jax.Array | None, b: int, l: int) -> jax.Array:
    """(b, l) bool: True where the state is reset, i.e. ``ids[t] != ids[t-1]`` (never at t = 0)."""
    if segment_ids is None:
        return jnp.zeros((b, l), dtype=bool)
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(starts, ((0, 0), (1, 0)), constant_values=False)


def initial_state_or_zeros(initial_state: jax.Array | None, b: int, d: int, n: int) -> jax.Array:
    """(b, d, n) float32 starting state."""
    if initial_state is None:
        return jnp.zeros((b, d, n), f32)
    return initial_state.astype(f32)


def skip_and_gate(y: jax.Array, u: jax.Array, D: jax.Array | None, z: jax.Array | None) -> jax.Array:
    """float32 (b, l, d): ``(y + D * u) * silu(z)`` (each step optional)."""
    if D is not None:
        y = y + D.astype(f32) * u.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y


# --------------------------------------------------------------------------- reference
@functools.partial(jax.jit, static_argnames=("delta_softplus",))
def selective_scan_reference(
    u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, segment_ids=None,
):
    """Sequential selective scan (slow, obviously correct).

    Args:
      u, delta: (b, l, d).   A: (d, n).   B, C: (b, l, n) or (b, l, g, n).
      D, delta_bias: (d,) or None.   z: (b, l, d) or None.
      initial_state: (b, d, n) or None (zeros).   segment_ids: (b, l) int or None.

    Returns:
      y: (b, l, d) in u's dtype, final_state: (b, d, n) float32.
    """
    b, l, d = u.shape
    n = A.shape[-1]
    A = A.astype(f32)
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    resets = segment_starts(segment_ids, b, l)

    def step(state, xs):
        u_t, delta_t, B_t, C_t, reset_t = xs               # (b,d) (b,d) (b,g,n) (b,g,n) (b,)
        B_t = jnp.repeat(B_t, d // B_t.shape[1], axis=1)   # (b, d, n)
        C_t = jnp.repeat(C_t, d // C_t.shape[1], axis=1)   # (b, d, n)
        state = jnp.where(reset_t[:, None, None], 0.0, state)
        state = jnp.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t
        y_t = jnp.sum(state * C_t, axis=-1)                 # (b, d)
        return state, y_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = (u.astype(f32), delta, as_grouped(B), as_grouped(C), resets)
    final_state, y = jax.lax.scan(
        step, initial_state_or_zeros(initial_state, b, d, n), tuple(map(time_major, xs))
    )
    y = skip_and_gate(time_major(y), u, D, z)
    return y.astype(u.dtype), final_state
