"""Sequential reference for the Mamba-2 SSD (state-space duality) op.

This file is the ground truth: a plain ``lax.scan`` over time that applies the
recurrence one position at a time.  It is slow (``l`` sequential steps) but
short enough to check by eye.  The small helpers at the top (dt preprocessing,
segment resets, the D skip / z gate) define the semantics shared by every
backend; the faster backends import them from here.

Shapes (channels last):
    x  (b, l, h, p)     dt (b, l, h)     A (h,)
    B  (b, l, g, n)     C  (b, l, g, n)  -- head i reads group i // (h // g)
    D  (h,) or (h, p)   z  (b, l, h, p)  dt_bias (h,)
    initial_state (b, h, p, n)           segment_ids (b, l) integer

Recurrence per head (state (p, n), all in float32):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)
    y_t     = state_t @ C_t  (+ D * x_t)      then  y_t *= silu(z_t)
with state_{t-1} replaced by zeros wherever segment_ids[t] != segment_ids[t-1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST

DEFAULT_DT_LIMIT = (0.0, float("inf"))


# --------------------------------------------------------------------------
# Semantics shared by all backends
# --------------------------------------------------------------------------

def preprocess_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT):
    """dt (b, l, h) -> float32 (b, l, h): ``+ dt_bias``, softplus, clip (in this order)."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    return dt


def segment_starts(segment_ids, batch: int, length: int):
    """Bool (b, l): True where the state is reset, i.e. ``ids[t] != ids[t-1]``.

    Position 0 is never a reset (that is where ``initial_state`` enters).  With
    ``segment_ids=None`` nothing is ever reset.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), dtype=bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), dtype=bool), changed], axis=1)


def heads_per_group_view(B, num_heads: int):
    """B (b, l, g, n) -> float32 (b, l, h, n): head i reads group i // (h // g)."""
    return jnp.repeat(B.astype(jnp.float32), num_heads // B.shape[2], axis=2)


def apply_skip_and_gate(y, x, D=None, z=None):
    """y float32 (b, l, h, p) -> x.dtype: ``y + D * x`` then ``* silu(z)``."""
    if D is not None:
        D = D.astype(jnp.float32)
        D = D[:, None] if D.ndim == 1 else D  # (h, 1) or (h, p)
        y = y + D * x.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)


# --------------------------------------------------------------------------
# The sequential recurrence
# --------------------------------------------------------------------------

def ssd_reference(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None,
                  dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, initial_state=None,
                  segment_ids=None):
    """Sequential SSD.  Returns ``(y (b, l, h, p) x.dtype, final_state (b, h, p, n) f32)``.

    ``chunk_size`` is accepted for a uniform backend signature and ignored.
    """
    del chunk_size
    b, l, h, p = x.shape
    n = B.shape[-1]
    dt = preprocess_dt(dt, dt_bias, dt_softplus, dt_limit)       # (b, l, h)
    decay = jnp.exp(dt * A.astype(jnp.float32))                    # (b, l, h)
    Bh = heads_per_group_view(B, h)                                # (b, l, h, n)
    Ch = heads_per_group_view(C, h)                                # (b, l, h, n)
    reset = segment_starts(segment_ids, b, l)                      # (b, l)
    if initial_state is None:
        state = jnp.zeros((b, h, p, n), jnp.float32)
    else:
        state = initial_state.astype(jnp.float32)

    def step(state, inputs):
        x_t, dt_t, decay_t, B_t, C_t, reset_t = inputs  # (b,h,p) (b,h) (b,h) (b,h,n) (b,h,n) (b,)
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        dx_t = dt_t[:, :, None] * x_t                                       # (b, h, p)
        state = decay_t[:, :, None, None] * state + dx_t[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t, precision=HIGHEST)
        return state, y_t

    time_major = lambda a: jnp.moveaxis(a, 1, 0)
    inputs = (x.astype(jnp.float32), dt, decay, Bh, Ch, reset)
    final_state, y = jax.lax.scan(step, state, tuple(map(time_major, inputs)))
    y = jnp.moveaxis(y, 0, 1)                                      # (b, l, h, p)
    return apply_skip_and_gate(y, x, D, z), final_state
