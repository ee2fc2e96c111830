"""Pieces shared by the two Pallas SSD backends (``pallas_gpu`` on Triton, ``pallas_tpu`` on Mosaic).

Both backends run one plan, the chunk decomposition of :mod:`pallas_kernels.ssd.xla` with blocks
of ``T`` positions (the kernel's chunk):

* **forward** (one kernel): a grid over (batch, head[, head-dim block]); each program keeps its
  (p, n) float32 state on chip and walks the chunks in order.  Per chunk it evaluates the
  quadratic intra-chunk form, adds the contribution of the carried state and updates the state
  (:func:`chunk_forward`), so chunk states never go through device memory.  Under
  differentiation it also writes the state entering every chunk (the only residual besides the
  inputs), and the pre-gate output when ``z`` is given.
* **backward** (two kernels):
    1. *reverse state sweep*: the same grid walking the chunks backwards, carrying the gradient
       of the state (:func:`dstate_step`); it writes the gradient of the state leaving every
       chunk and, at the end, the gradient of ``initial_state``.
    2. *chunk gradients*: a grid over (batch, chunk, group[, head split]) with no sequential
       dependency.  With the states entering and the state gradients leaving its chunk, each
       program loops over the heads of its group (:func:`chunk_backward_head`) and produces
       dx, the direct part of ddt, the gradient of the log-decay cumsum, and, summed over its
       heads, dB and dC (the C.B^T tile is computed once per group).
* plain XLA around the kernels: dt preprocessing (bias, softplus, clip: differentiated by JAX),
  the per-chunk cumsum of ``dt * A`` (JAX transposes it into the reverse cumsum that turns the
  cumsum gradient into dA and the rest of ddt), padding, the sum of per-split dB/dC partials, and
  the ``z``-gate gradient.  ``D`` and the ``z`` gate of the forward are fused in the kernel.

Notation inside a chunk (``t``/``s`` target/source positions, all float32):
    cum[t]  = sum_{k<=t in chunk} dt_k A            (log-decay from the chunk start)
    L[t, s] = exp(cum[t] - cum[s]) if s <= t and same segment, else 0
    y[t]    = sum_s C_t.B_s L[t, s] dt_s x_s + reach_t exp(cum[t]) H_in C_t
    H_out   = carry exp(cum[T-1]) H_in + sum_s w_s dt_s x_s (x) B_s,  w_s = exp(cum[T-1] - cum[s])
with ``reach_t`` (no reset between the chunk start and t), ``carry`` (no reset in the chunk) and
the ``same segment as the last position`` factor in ``w`` all 1 without segment ids.

The helpers below are written for 2-D tiles only, with per-position vectors passed both as a
column (T, 1) and a row (1, T), using primitives that both the Triton and the Mosaic lowering
accept (no ``jax.nn``).  Segment ids travel as float32 (exact for < 2**24 segments).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ssd.reference import preprocess_dt, segment_starts

f32 = jnp.float32


# --------------------------------------------------------------------------- static config
@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: it is a ``custom_vjp`` nondiff argument)."""
    block_t: int                 # T, the kernel's chunk
    heads_per_group: int         # r = h // g
    has_init: bool
    has_segments: bool
    has_D: bool
    has_z: bool
    op_dtype: Any                # dtype of matmul operands (x.dtype)
    state_dtype: Any             # dtype of the states written for the backward
    backend_options: Any = None  # backend-specific (block sizes, warps, interpret)

    @property
    def precision(self):
        # float32 inputs: full-precision products (no tf32), bf16: native.
        return lax.Precision.HIGHEST if jnp.dtype(self.op_dtype) == jnp.float32 else None


# --------------------------------------------------------------------------- in-kernel math
_DIMS = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}


def mm(a, b, form, precision=None):
    """2-D matmul with float32 accumulation: ``a @ b`` ("nn"), ``a @ b.T`` ("nt"), ``a.T @ b`` ("tn")."""
    return lax.dot_general(a, b, (_DIMS[form], ((), ())), precision=precision,
                           preferred_element_type=f32)


def last_of_row(row):
    """(1, T) -> (1, 1): the last entry, as a masked sum (no dynamic indexing of a value)."""
    T = row.shape[1]
    is_last = lax.broadcasted_iota(jnp.int32, row.shape, 1) == T - 1
    return jnp.sum(jnp.where(is_last, row, jnp.zeros_like(row)), axis=1, keepdims=True)


def is_last_col(T):
    """(T, 1) bool, True at position T - 1."""
    return lax.broadcasted_iota(jnp.int32, (T, 1), 0) == T - 1


def sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


class Segments(NamedTuple):
    """Segment masks of one chunk (all from float32 segment indices)."""
    same: Any        # (T, T) bool: positions t and s are in the same segment
    reach: Any       # (T, 1) bool: the state entering the chunk reaches position t
    same_last: Any   # (T, 1) bool: position s is in the segment of the chunk's last position
    carry: Any       # (1, 1) bool: the state entering the chunk survives to its end


def segment_masks(sid_col, sid_row, sid_prev):
    """Masks from sid (segment index, non-decreasing along the row) of the chunk's positions,
    as (T, 1) and (1, T), and ``sid_prev`` (scalar or (1, 1)): sid of the position before the
    chunk (0 for the first chunk: the segment ``initial_state`` belongs to)."""
    sid_last = last_of_row(sid_row)
    return Segments(same=sid_col == sid_row, reach=sid_col == sid_prev,
                    same_last=sid_col == sid_last, carry=sid_last == sid_prev)


def decay_matrix(cum_col, cum_row, seg):
    """L (T, T) float32: exp(cum[t] - cum[s]) where s <= t (and same segment), else 0."""
    T = cum_col.shape[0]
    keep = (lax.broadcasted_iota(jnp.int32, (T, T), 0)
            >= lax.broadcasted_iota(jnp.int32, (T, T), 1))
    if seg is not None:
        keep = jnp.logical_and(keep, seg.same)
    return jnp.exp(jnp.where(keep, cum_col - cum_row, -jnp.inf))


def _masked(v, mask):
    return v if mask is None else jnp.where(mask, v, jnp.zeros_like(v))


def chunk_forward(x, B, C, dt_col, dt_row, cum_col, cum_row, state, seg, precision):
    """One chunk of the forward.

    x (T, pb), B and C (T, n) in the operand dtype; dt/cum as (T, 1) and (1, T) float32;
    state (pb, n) float32 entering the chunk.  Returns (y (T, pb) float32, state leaving).
    """
    op = x.dtype
    scores = mm(C, B, "nt", precision) * decay_matrix(cum_col, cum_row, seg) * dt_row
    y = mm(scores.astype(op), x, "nn", precision)                     # intra-chunk
    from_start = _masked(jnp.exp(cum_col), None if seg is None else seg.reach)
    y = y + from_start * mm(C, state.astype(op), "nt", precision)     # carried state
    return y, chunk_state_step(x, B, dt_col, cum_col, cum_row, state, seg, precision)


def chunk_state_step(x, B, dt_col, cum_col, cum_row, state, seg, precision):
    """The state leaving a chunk from the state entering it (the forward without y).

    Shapes as :func:`chunk_forward`; returns (pb, n) float32.
    """
    op = x.dtype
    cum_last = last_of_row(cum_row)
    to_end = _masked(jnp.exp(cum_last - cum_col), None if seg is None else seg.same_last)
    xw = (x.astype(f32) * (to_end * dt_col)).astype(op)
    keep = jnp.exp(cum_last)
    if seg is not None:
        keep = jnp.where(seg.carry, keep, jnp.zeros_like(keep))
    return state * keep + mm(xw, B, "tn", precision)                   # (pb, n)


def dstate_step(dstate, dy, C, cum_col, cum_row, seg, precision):
    """Reverse step: gradient of the state leaving a chunk -> gradient of the state entering it.

    dstate (pb, n) float32; dy (T, pb) and C (T, n) in the operand dtype.
    """
    op = dy.dtype
    from_start = _masked(jnp.exp(cum_col), None if seg is None else seg.reach)
    keep = jnp.exp(last_of_row(cum_row))
    if seg is not None:
        keep = jnp.where(seg.carry, keep, jnp.zeros_like(keep))
    dyw = (dy.astype(f32) * from_start).astype(op)
    return dstate * keep + mm(dyw, C, "tn", precision)


class HeadGrads(NamedTuple):
    dx: Any          # (T, p) float32 (without the D term)
    ddt: Any         # (T, 1) direct part of d(dt)
    dcum_col: Any    # (T, 1) } gradient of cum = dcum_col + dcum_row
    dcum_row: Any    # (1, T) }
    W: Any           # (T, T) gradient of C.B^T (intra-chunk), to be summed over the group
    dB: Any          # (T, n) state part of dB
    dC: Any          # (T, n) carried-state part of dC


def chunk_backward_head(x, dy, B, C, CB, dt_col, dt_row, cum_col, cum_row, state, dstate, seg,
                        precision):
    """Gradients of one head over one chunk.

    x, dy (T, p) and B, C (T, n) in the operand dtype; CB = C @ B.T (T, T) float32; state
    (p, n): the state entering the chunk, dstate (p, n): the gradient of the state leaving it.
    """
    op = x.dtype
    T = x.shape[0]
    L = decay_matrix(cum_col, cum_row, seg)
    cum_last = last_of_row(cum_row)
    to_end = _masked(jnp.exp(cum_last - cum_col), None if seg is None else seg.same_last)
    from_start = _masked(jnp.exp(cum_col), None if seg is None else seg.reach)
    keep = jnp.exp(cum_last)
    if seg is not None:
        keep = jnp.where(seg.carry, keep, jnp.zeros_like(keep))

    # d(dt_s x_s): through the intra-chunk form and the state leaving the chunk.
    B_dstate = mm(B, dstate.astype(op), "nt", precision)               # (T, p) = B_s . dH^T
    G = mm((CB * L).astype(op), dy, "tn", precision) + to_end * B_dstate
    dx = G * dt_col
    ddt = jnp.sum(G * x.astype(f32), axis=1, keepdims=True)            # (T, 1)

    # Intra-chunk: gradient of the scores C_t.B_s, and of cum through L.
    W = mm(dy, x, "nt", precision) * L * dt_row                       # (T, T)
    M = W * CB
    dcum_col = jnp.sum(M, axis=1, keepdims=True)
    dcum_row = -jnp.sum(M, axis=0, keepdims=True)

    # Carried state: y_t += from_start_t C_t H^T.
    dy_state = mm(dy, state.astype(op), "nn", precision)              # (T, n)
    dC = from_start * dy_state
    dcum_col = dcum_col + from_start * jnp.sum(dy_state * C.astype(f32), axis=1, keepdims=True)

    # State leaving the chunk: keep * H + sum_s to_end_s dt_s x_s (x) B_s.
    xw = x.astype(f32) * (to_end * dt_col)
    dB = mm(xw.astype(op), dstate.astype(op), "nn", precision)        # (T, n)
    q = jnp.sum(xw * B_dstate, axis=1, keepdims=True)                 # (T, 1)
    at_end = jnp.sum(q, axis=0, keepdims=True) + keep * jnp.sum(
        jnp.sum(dstate * state.astype(f32), axis=1, keepdims=True), axis=0, keepdims=True)
    dcum_col = dcum_col - q + jnp.where(is_last_col(T), at_end, jnp.zeros_like(q))
    return HeadGrads(dx=dx, ddt=ddt, dcum_col=dcum_col, dcum_row=dcum_row, W=W, dB=dB, dC=dC)


def group_grads_from_scores(W_sum, B, C, precision):
    """Intra-chunk dB, dC (T, n) from the group's summed score gradient W_sum (T, T)."""
    op = B.dtype
    Wo = W_sum.astype(op)
    return mm(Wo, C, "tn", precision), mm(Wo, B, "nn", precision)


# --------------------------------------------------------------------------- pallas_call outputs
def _varying_axes(arrays):
    axes = frozenset()
    for a in arrays:
        if a is None:
            continue
        aval = jax.typeof(a)
        mat = getattr(aval, "manual_axis_type", None)
        axes |= frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
    return axes


def out_struct(shape, dtype, inputs):
    """``jax.ShapeDtypeStruct`` for a kernel output, varying over the manual mesh axes that any
    of ``inputs`` varies over: inside ``jax.shard_map`` (check_vma on) pallas_call outputs must
    declare it.  Outside shard_map the set is empty."""
    axes = _varying_axes(inputs)
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    manual_axis_type = getattr(jax.sharding, "ManualAxisType", None)
    if manual_axis_type is not None:          # JAX >= 0.10
        return jax.ShapeDtypeStruct(shape, dtype,
                                    manual_axis_type=manual_axis_type(varying=axes))
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def _make_varying(a, axes):
    if hasattr(jax.lax, "pcast"):             # JAX >= 0.8
        return jax.lax.pcast(a, tuple(axes), to="varying")
    return jax.lax.pvary(a, tuple(axes))


def vary_alike(P):
    """Inside ``jax.shard_map``: make every array vary over the union of the manual axes the
    arrays vary over (e.g. A or D, sharded over heads only, next to x sharded over batch and
    heads), so the kernels' outputs and the custom_vjp cotangents have one type; JAX's own
    transpose of this cast then sums the gradients of such arrays over the other axes."""
    axes = _varying_axes(P)
    if not axes:
        return P
    fix = lambda a: a if a is None or not (missing := axes - _varying_axes([a])) else (
        _make_varying(a, sorted(missing)))
    return Prepared(*(fix(a) for a in P))


# --------------------------------------------------------------------------- XLA around the kernels
def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


class Prepared(NamedTuple):
    """Inputs in the kernels' layout, padded to ``L = nc * T`` positions (channels last)."""
    x: Any            # (b, L, h, p) op dtype
    dt: Any           # (b, h, L) float32, preprocessed; 0 on padding
    cum: Any          # (b, h, L) float32, per-chunk cumsum of dt * A
    B: Any            # (b, L, g, n)
    C: Any            # (b, L, g, n)
    D: Any            # (h, p) float32 or None
    z: Any            # (b, L, h, p) or None
    init: Any         # (b, h, p, n) float32 or None
    sid: Any          # (b, L) float32 segment index or None
    sid_prev: Any     # (b, nc) float32: sid before each chunk, or None


def prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, segment_ids,
            block_t, pad_p=None, pad_n=None):
    """Differentiable preprocessing in XLA (JAX differentiates it).

    Pads the length to a multiple of ``block_t`` (padded steps have dt = 0, x = B = C = 0 and
    continue the last segment: they change nothing) and, if asked, p and n to ``pad_p`` /
    ``pad_n`` (zeros: no contribution).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    T = block_t
    L = -(-l // T) * T
    nc = L // T
    pl_, pp, pn = L - l, (pad_p or p) - p, (pad_n or n) - n

    def pad(a, widths):
        return a if not any(w for _, w in widths) else jnp.pad(a, widths)

    dtp = preprocess_dt(dt, dt_bias, dt_softplus, dt_limit)               # (b, l, h) f32
    dtp = pad(jnp.swapaxes(dtp, 1, 2), [(0, 0), (0, 0), (0, pl_)])       # (b, h, L)
    # A running sum per chunk, as mamba_ssm's dA_cumsum; the decays are exp(cum_t - cum_s). When a
    # chunk's decays sum to hundreds (dt |A| of 1 or more per step: a state keeping e^-1 or less per
    # token) that difference loses float32 digits: dA's error reached 1.3e-5 (64-step chunks, dt in
    # (0.5, 2), A in (-4, -0.5)) while outputs and the other gradients stayed within 2.4e-6, and at
    # Mamba-2's usual dt and A dA is within 1.1e-6. xla.py's masked segment sums avoid it, at
    # O(chunk^2) adds per chunk.
    cum = jnp.cumsum((dtp * A.astype(f32)[None, :, None]).reshape(b, h, nc, T), axis=-1)
    cum = cum.reshape(b, h, L)

    xs = pad(x, [(0, 0), (0, pl_), (0, 0), (0, pp)])
    Bs = pad(B, [(0, 0), (0, pl_), (0, 0), (0, pn)]).astype(x.dtype)
    Cs = pad(C, [(0, 0), (0, pl_), (0, 0), (0, pn)]).astype(x.dtype)
    Ds = None
    if D is not None:
        Ds = D.astype(f32)
        Ds = jnp.broadcast_to(Ds[:, None], (h, p)) if Ds.ndim == 1 else Ds
        Ds = pad(Ds, [(0, 0), (0, pp)])
    zs = None if z is None else pad(z, [(0, 0), (0, pl_), (0, 0), (0, pp)])
    init = None
    if initial_state is not None:
        init = pad(initial_state.astype(f32), [(0, 0), (0, 0), (0, pp), (0, pn)])
    sid = sid_prev = None
    if segment_ids is not None:
        sid = jnp.cumsum(segment_starts(segment_ids, b, l).astype(jnp.int32), axis=1)
        if pl_:   # continue the last segment (concatenate: no slicing of the batch dim)
            sid = jnp.concatenate([sid, jnp.broadcast_to(sid[:, -1:], (b, pl_))], axis=1)
        sid = sid.astype(f32)
        sid = lax.stop_gradient(sid)
        sid_prev = jnp.concatenate([jnp.zeros((b, 1), f32), sid[:, T - 1:L - 1:T]], axis=1)
    return Prepared(xs, dtp, cum, Bs, Cs, Ds, zs, init, sid, sid_prev)


def make_core(forward, backward_dstates, backward_chunks):
    """Differentiable core ``core(cfg, prepared) -> (y, final_state)`` over kernel drivers.

    ``forward(cfg, P, save)`` -> (y, final, states or None, y_pre or None);
    ``backward_dstates(cfg, P, dy, dfinal)`` -> (dstates, dinit);
    ``backward_chunks(cfg, P, dy, states, dstates)`` -> (dx, ddt, dcum, dB, dC, dD or None),
    with dB/dC (b, L, g, n) float32 and dD (h, p) float32.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(cfg, P):
        y, final, _, _ = forward(cfg, P, False)
        return y, final

    def core_fwd(cfg, P):
        y, final, states, y_pre = forward(cfg, P, True)
        return (y, final), (P, states, y_pre)

    def core_bwd(cfg, res, cts):
        P, states, y_pre = res
        dy, dfinal = cts
        dz = None
        if cfg.has_z:
            zf = P.z.astype(f32)
            s = sigmoid(zf)
            dyf = dy.astype(f32)
            dz = (dyf * y_pre.astype(f32) * s * (1.0 + zf * (1.0 - s))).astype(P.z.dtype)
            dy = (dyf * zf * s).astype(cfg.op_dtype)
        else:
            dy = dy.astype(cfg.op_dtype)
        dstates, dinit = backward_dstates(cfg, P, dy, dfinal.astype(f32))
        dx, ddt, dcum, dB, dC, dD = backward_chunks(cfg, P, dy, states, dstates)
        zeros = lambda a: None if a is None else jnp.zeros_like(a)
        return (Prepared(
            x=dx.astype(P.x.dtype), dt=ddt, cum=dcum, B=dB.astype(P.B.dtype),
            C=dC.astype(P.C.dtype), D=dD, z=dz, init=dinit if cfg.has_init else None,
            sid=zeros(P.sid), sid_prev=zeros(P.sid_prev)),)

    core.defvjp(core_fwd, core_bwd)
    return core


def run(core, x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
        initial_state, segment_ids, block_t, state_dtype=None, pad_p=None, pad_n=None,
        backend_options=None):
    """Shared wrapper: preprocessing, the core, and slicing back to (b, l, h, p)."""
    del chunk_size
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    P = prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, segment_ids,
                block_t, pad_p, pad_n)
    P = vary_alike(P)
    cfg = Config(block_t=block_t, heads_per_group=h // g, has_init=P.init is not None,
                 has_segments=P.sid is not None, has_D=P.D is not None, has_z=P.z is not None,
                 op_dtype=jnp.dtype(x.dtype),
                 state_dtype=jnp.dtype(state_dtype or (f32 if x.dtype == f32 else x.dtype)),
                 backend_options=backend_options)
    y, final = core(cfg, P)
    return y[:, :l, :, :p], final[:, :, :p, :n]
