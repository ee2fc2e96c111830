"""Chunked SSD in pure JAX/XLA (the four-step algorithm of Mamba-2).

The sequence is cut into chunks of ``Q = chunk_size`` positions.  Inside a
chunk the recurrence is evaluated as a masked quadratic "attention"; across
chunks a short ``lax.scan`` passes the (p, n) state along:

  1. intra-chunk:   y_diag[t] = sum_{s<=t} (C_t . B_s) * exp(segsum[t, s]) * dt_s * x_s
  2. chunk states:  S_c       = sum_s exp(segsum[Q-1, s]) * dt_s * outer(x_s, B_s)
  3. state passing: H_{c+1}   = exp(sum_c dt*A) * H_c + S_c       (scan over chunks)
  4. state->output: y_off[t]  = exp(cumsum(dt*A)[t]) * (H_c @ C_t)

where ``segsum[t, s] = sum_{s<k<=t} dt_k * A`` is the log-decay from s to t.

Segment resets (packed documents) enter as masks built from ``sid``, the
running count of resets along the row (positions with equal ``sid`` belong to
the same contiguous segment):

  * step 1/2: the pair (t, s) is kept only if sid[t] == sid[s]; this also
    makes S_c contain only positions in the segment of the chunk's last one;
  * step 3:   H_c is carried through chunk c only if the chunk contains no
    reset, i.e. sid[last of c] == sid[last of c-1];
  * step 4:   H_c reaches position t only if no reset lies between the chunk
    start and t, i.e. sid[t] == sid[last of c-1].

For chunk 0, "sid of the last position of chunk -1" is 0: the segment that
``initial_state`` belongs to.  Everything is computed in float32.

Index letters in the einsums: b batch, c chunk, t/s position in the chunk
(target/source), g group, r head within the group (h = g * r), p head dim,
n state dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.reference import (
    DEFAULT_DT_LIMIT,
    HIGHEST,
    apply_skip_and_gate,
    preprocess_dt,
    segment_starts,
)


def segsum(a, keep):
    """Stable segment sums of log-decays.

    a    (..., Q)    per-position log-decay dt * A (<= 0).
    keep (..., Q, Q) bool, broadcastable; extra mask on pairs (t, s).
    Returns (..., Q, Q): out[..., t, s] = sum_{s<k<=t} a[k] where s <= t and
    keep[t, s], else -inf.  Computed by a masked cumsum (not as a difference
    of two running sums), so no cancellation and never exp(+large) afterwards.
    """
    Q = a.shape[-1]
    k_after_s = jnp.tril(jnp.ones((Q, Q), dtype=bool), k=-1)          # [k, s]: k > s
    terms = jnp.where(k_after_s, a[..., :, None], 0.0)                # [k, s] = a[k]
    sums = jnp.cumsum(terms, axis=-2)                                 # [t, s]
    causal = jnp.tril(jnp.ones((Q, Q), dtype=bool))                  # [t, s]: t >= s
    return jnp.where(causal & keep, sums, -jnp.inf)


def _pass_states(states, chunk_decay, carry, initial_state):
    """Inter-chunk recurrence (step 3).

    states (b, c, g, r, p, n) per-chunk states; chunk_decay (b, c, g, r);
    carry (b, c) bool (False: a reset inside chunk c drops the incoming state);
    initial_state (b, g, r, p, n).
    Returns (state entering each chunk (b, c, g, r, p, n), final state (b, g, r, p, n)).
    """
    def step(state_in, inputs):
        S_c, decay_c, carry_c = inputs
        kept = jnp.where(carry_c[:, None, None, None, None],
                         decay_c[..., None, None] * state_in, 0.0)
        return kept + S_c, state_in

    chunk_major = lambda a: jnp.moveaxis(a, 1, 0)
    final, entering = jax.lax.scan(
        step, initial_state, (chunk_major(states), chunk_major(chunk_decay), chunk_major(carry)))
    return jnp.moveaxis(entering, 0, 1), final


def ssd_xla(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
            dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, initial_state=None,
            segment_ids=None):
    """Chunked SSD.  Returns ``(y (b, l, h, p) x.dtype, final_state (b, h, p, n) f32)``."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    Q = chunk_size
    f32 = jnp.float32

    dt = preprocess_dt(dt, dt_bias, dt_softplus, dt_limit)            # (b, l, h)
    sid = jnp.cumsum(segment_starts(segment_ids, b, l), axis=1)       # (b, l) segment index

    # Pad to a multiple of Q.  Padded steps have dt = 0 (decay 1, no input) and
    # continue the last segment, so they leave the final state unchanged.
    pad = (-l) % Q
    c = (l + pad) // Q

    def chunked(a, *tail):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, c, Q, *tail)

    xc = chunked(x.astype(f32), g, r, p)                              # (b, c, Q, g, r, p)
    dtc = chunked(dt, g, r)                                           # (b, c, Q, g, r)
    Bc = chunked(B.astype(f32), g, n)                                 # (b, c, Q, g, n)
    Cc = chunked(C.astype(f32), g, n)                                 # (b, c, Q, g, n)
    sid = jnp.pad(sid, [(0, 0), (0, pad)], mode="edge").reshape(b, c, Q)

    # Log-decays, time axis last: (b, c, g, r, Q).
    dtA = jnp.moveaxis(dtc * A.astype(f32).reshape(g, r), 2, -1)
    decay_from_start = jnp.exp(jnp.cumsum(dtA, axis=-1))              # (b, c, g, r, Q)
    chunk_decay = decay_from_start[..., -1]                           # (b, c, g, r)

    # Segment masks.
    same_segment = sid[:, :, :, None] == sid[:, :, None, :]           # (b, c, Q, Q) [t, s]
    sid_before = jnp.concatenate(                                     # (b, c): sid of the last
        [jnp.zeros((b, 1), sid.dtype), sid[:, :-1, -1]], axis=1)      # position of chunk c-1
    state_reaches = sid == sid_before[:, :, None]                     # (b, c, Q)
    carry = sid[:, :, -1] == sid_before                               # (b, c)

    # Decay matrix L[t, s] = exp(segsum), zero across segments and above the diagonal.
    L = jnp.exp(segsum(dtA, same_segment[:, :, None, None]))          # (b, c, g, r, Q, Q)
    dtx = dtc[..., None] * xc                                         # (b, c, Q, g, r, p)

    # 1. Intra-chunk output (quadratic form).  C.B is shared by the heads of a group.
    CB = jnp.einsum("bctgn,bcsgn->bcgts", Cc, Bc, precision=HIGHEST)  # (b, c, g, Q, Q)
    scores = CB[:, :, :, None] * L                                    # (b, c, g, r, Q, Q)
    y_diag = jnp.einsum("bcgrts,bcsgrp->bctgrp", scores, dtx, precision=HIGHEST)

    # 2. State of each chunk from its own inputs (decay to the chunk end = last row of L).
    decay_to_end = L[..., -1, :]                                      # (b, c, g, r, Q)
    states = jnp.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", decay_to_end, dtx, Bc,
                        precision=HIGHEST)                            # (b, c, g, r, p, n)

    # 3. Pass states across chunks.
    if initial_state is None:
        init = jnp.zeros((b, g, r, p, n), f32)
    else:
        init = initial_state.astype(f32).reshape(b, g, r, p, n)
    entering, final_state = _pass_states(states, chunk_decay, carry, init)

    # 4. Output from the state entering each chunk.
    out_decay = decay_from_start * state_reaches[:, :, None, None]    # (b, c, g, r, Q)
    y_off = jnp.einsum("bctgn,bcgrpn,bcgrt->bctgrp", Cc, entering, out_decay,
                       precision=HIGHEST)

    y = (y_diag + y_off).reshape(b, c * Q, h, p)[:, :l]
    return apply_skip_and_gate(y, x, D, z), final_state.reshape(b, h, p, n)
