"""Selective scan as Pallas kernels for TPU (Mosaic).

Layout: the (n, d_block) float32 state has channels on the 128 lanes and the state index on
sublanes.  The grid is (batch, d // d_block, l // chunk) with the time axis innermost and
"arbitrary": the state is carried from one time block to the next in a VMEM scratch, while
Pallas double-buffers the (chunk, d_block) blocks of u / delta / z / y through VMEM.

Per time block the kernel first does the vectorisable work on whole (chunk, d_block) tiles
(delta + bias, softplus, delta * u, the z gate, D), then walks the block's steps with a
``fori_loop`` doing only the recurrence.  B and C arrive transposed, (n, chunk) per block,
and a step takes its column with a one-hot lane reduction (a dynamic lane slice is not
something Mosaic lowers).

Under differentiation the forward also writes the state at the start of each time block
(the checkpoints).  The backward runs the grid's time axis in reverse (the index maps read
block ``nc - 1 - c``): it recomputes the block's states from its checkpoint into a VMEM
scratch (never HBM), runs the adjoint recurrence backwards over them, and finishes the
per-element gradients vectorised over the block.  dA, dD and d(delta_bias) accumulate in
output blocks whose index ignores time (they stay resident in VMEM); dB / dC are written
per (batch, channel block) as (n, chunk) tiles and summed over channel blocks in XLA.

Block-shape rules on real TPUs: ``chunk`` must be a multiple of 128 or cover l, d_block a
multiple of 128 or all of d.  Interpret mode (``interpret=True``, run with
``pltpu.InterpretParams``) accepts any sizes, which the CPU tests use.  Not yet compiled on
a TPU: this workplace lends GPUs only.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .pallas_common import (
    ScanOptions,
    f32,
    gate_and_grad,
    keep_from_segments,
    make_core,
    out_struct,
    sigmoid,
    softplus,
)


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """d_block: channels per program (lanes); chunk: time steps per grid step (and
    checkpoint spacing); sizes are clipped to the problem."""
    d_block: int = 256
    chunk: int = 128


DEFAULT_CONFIG = TpuConfig()


@dataclasses.dataclass(frozen=True)
class _Static(ScanOptions):
    b: int
    l: int
    d: int
    n: int
    g: int
    d_block: int
    chunk: int
    interpret: bool

    @property
    def num_chunks(self):
        return pl.cdiv(self.l, self.chunk)

    @property
    def last(self):  # steps in the last time block
        return self.l - (self.num_chunks - 1) * self.chunk


def _choose_d_block(h: int, cap: int) -> int:
    """Largest multiple of 128 <= cap dividing h (channels per group); else the largest
    divisor of h <= cap (fine in interpret mode; Mosaic wants 128-multiples or all of d)."""
    for block in range(min(cap, h) // 128 * 128, 0, -128):
        if h % block == 0:
            return block
    return max(x for x in range(1, min(cap, h) + 1) if h % x == 0)


def _specs(st: _Static, reverse: bool):
    T, db, n, nc = st.chunk, st.d_block, st.n, st.num_chunks
    bpg = (st.d // st.g) // db
    tc = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
    return dict(
        btd=pl.BlockSpec((None, T, db), lambda i, j, c: (i, tc(c), j)),
        nd=pl.BlockSpec((n, db), lambda i, j, c: (0, j)),
        bgnl=pl.BlockSpec((None, None, n, T), lambda i, j, c: (i, lax.div(j, bpg), 0, tc(c))),
        row=pl.BlockSpec((1, db), lambda i, j, c: (0, j)),
        bnd=pl.BlockSpec((None, n, db), lambda i, j, c: (i, 0, j)),
        keep=pl.BlockSpec((None, T, 1), lambda i, j, c: (i, tc(c), 0)),
        ckpt=pl.BlockSpec((None, None, n, db), lambda i, j, c: (i, tc(c), 0, j)),
        b1d=pl.BlockSpec((None, 1, db), lambda i, j, c: (i, 0, j)),
        part=pl.BlockSpec((None, None, n, T), lambda i, j, c: (i, j, 0, tc(c))),
    )


def _params(st):
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if st.interpret else False,
    )


def _take(it, flag):
    return next(it) if flag else None


def _column(mat, sel):
    """Column t of mat (n, T) as (n, 1), t given by the one-hot lane mask sel (1, T)."""
    return jnp.sum(jnp.where(sel, mat, 0.0), axis=1, keepdims=True)


def _deltas(st, dt_ref, bias_ref):
    pre = dt_ref[...].astype(f32)
    if st.has_bias:
        pre = pre + bias_ref[...]
    return pre, (softplus(pre) if st.softplus else pre)


# --------------------------------------------------------------------------- forward
def _fwd_kernel(st: _Static, save: bool, *refs):
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref = (next(it) for _ in range(5))
    D_ref, z_ref, bias_ref, h0_ref, keep_ref = (
        _take(it, f) for f in (st.has_D, st.has_z, st.has_bias, st.has_h0, st.has_keep))
    y_ref, final_ref = next(it), next(it)
    ck_ref = _take(it, save)
    h_s, dl_s, x_s, y_s = (next(it) for _ in range(4))

    c = pl.program_id(2)
    T = st.chunk

    @pl.when(c == 0)
    def _():
        h_s[...] = h0_ref[...] if st.has_h0 else jnp.zeros(h_s.shape, f32)

    if save:
        ck_ref[...] = h_s[...]
    u = u_ref[...].astype(f32)
    _, dl = _deltas(st, dt_ref, bias_ref)
    dl_s[...] = dl
    x_s[...] = dl * u
    A = A_ref[...]
    Bt = B_ref[...].astype(f32)
    Ct = C_ref[...].astype(f32)
    lanes = lax.broadcasted_iota(jnp.int32, (1, T), 1)

    def step(t, h):
        row = pl.ds(t, 1)
        a = jnp.exp(dl_s[row, :] * A)
        if st.has_keep:
            a = a * keep_ref[row, :]
        sel = lanes == t
        h = a * h + _column(Bt, sel) * x_s[row, :]
        y_s[row, :] = jnp.sum(h * _column(Ct, sel), axis=0, keepdims=True)
        return h

    steps = jnp.where(c == st.num_chunks - 1, st.last, T)
    h = lax.fori_loop(0, steps, step, h_s[...])
    h_s[...] = h
    y = y_s[...]
    if st.has_D:
        y = y + D_ref[...] * u
    if st.has_z:
        y = y * gate_and_grad(z_ref[...].astype(f32))[0]
    y_ref[...] = y.astype(y_ref.dtype)

    @pl.when(c == st.num_chunks - 1)
    def _():
        final_ref[...] = h


def _forward(st: _Static, arrays, save: bool):
    u, delta, A, Bt, Ct, D, z, bias, h0, keep = arrays
    b, l, d, n, T, db = st.b, st.l, st.d, st.n, st.chunk, st.d_block
    s = _specs(st, reverse=False)
    ins = [(u, s["btd"]), (delta, s["btd"]), (A, s["nd"]), (Bt, s["bgnl"]), (Ct, s["bgnl"]),
           (D, s["row"]), (z, s["btd"]), (bias, s["row"]), (h0, s["bnd"]), (keep, s["keep"])]
    ins = [(x, spec) for x, spec in ins if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in ins])
    out_shape = [_sds((b, l, d), u.dtype), _sds((b, n, d), f32)]
    out_specs = [s["btd"], s["bnd"]]
    if save:
        out_shape.append(_sds((b, st.num_chunks, n, d), f32))
        out_specs.append(s["ckpt"])
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, st, save),
        out_shape=out_shape,
        grid=(b, d // db, st.num_chunks),
        in_specs=[spec for _, spec in ins],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((n, db), f32)] + [pltpu.VMEM((T, db), f32)] * 3,
        name="selective_scan_fwd",
        **_params(st),
    )(*(x for x, _ in ins))
    return outs[0], outs[1], (outs[2] if save else None)


# --------------------------------------------------------------------------- backward
def _bwd_kernel(st: _Static, *refs):
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref = (next(it) for _ in range(5))
    D_ref, z_ref, bias_ref, keep_ref = (
        _take(it, f) for f in (st.has_D, st.has_z, st.has_bias, st.has_keep))
    ck_ref, dout_ref, dfinal_ref = next(it), next(it), next(it)
    du_ref, ddt_ref = next(it), next(it)
    dz_ref = _take(it, st.has_z)
    dB_ref, dC_ref, dA_ref = next(it), next(it), next(it)
    dD_ref, dbias_ref, dh0_ref = (_take(it, f) for f in (st.has_D, st.has_bias, st.has_h0))
    g_s, hs_s, dl_s, x_s, dy_s, ys_s, sB_s, sA_s = (next(it) for _ in range(8))

    c = pl.program_id(2)
    T, nc = st.chunk, st.num_chunks

    @pl.when(c == 0)
    def _():
        g_s[...] = dfinal_ref[...]
        dA_ref[...] = jnp.zeros(dA_ref.shape, f32)
        if st.has_D:
            dD_ref[...] = jnp.zeros(dD_ref.shape, f32)
        if st.has_bias:
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, f32)

    steps = jnp.where(c == 0, st.last, T)      # grid step 0 is the last time block
    u = u_ref[...].astype(f32)
    pre, dl = _deltas(st, dt_ref, bias_ref)
    dl_s[...] = dl
    x_s[...] = dl * u
    dout = dout_ref[...].astype(f32)
    if st.has_z:
        gate, gate_grad = gate_and_grad(z_ref[...].astype(f32))
        dy_s[...] = dout * gate
    else:
        dy_s[...] = dout
    A = A_ref[...]
    Bt = B_ref[...].astype(f32)
    Ct = C_ref[...].astype(f32)
    lanes = lax.broadcasted_iota(jnp.int32, (1, T), 1)

    def decay(row):
        a = jnp.exp(dl_s[row, :] * A)
        return a * keep_ref[row, :] if st.has_keep else a

    def recompute(t, h):
        row = pl.ds(t, 1)
        h = decay(row) * h + _column(Bt, lanes == t) * x_s[row, :]
        hs_s[t + 1] = h
        return h

    hs_s[0] = ck_ref[...]
    lax.fori_loop(0, steps, recompute, ck_ref[...])

    def adjoint(i, carry):
        g, dA, dB, dC = carry
        t = steps - 1 - i
        row, sel = pl.ds(t, 1), lanes == t
        h, h_prev = hs_s[t + 1], hs_s[t]
        a = decay(row)
        Bc, Cc = _column(Bt, sel), _column(Ct, sel)
        dy = dy_s[row, :]
        ys_s[row, :] = jnp.sum(h * Cc, axis=0, keepdims=True)
        dh = g + Cc * dy
        dC = jnp.where(sel, jnp.sum(h * dy, axis=1, keepdims=True), dC)
        dB = jnp.where(sel, jnp.sum(dh * x_s[row, :], axis=1, keepdims=True), dB)
        sB_s[row, :] = jnp.sum(dh * Bc, axis=0, keepdims=True)
        q = dh * (a * h_prev)
        sA_s[row, :] = jnp.sum(q * A, axis=0, keepdims=True)
        return a * dh, dA + q * dl_s[row, :], dB, dC

    zeros_nT = jnp.zeros((st.n, T), f32)
    g, dA, dB, dC = lax.fori_loop(
        0, steps, adjoint, (g_s[...], jnp.zeros(A.shape, f32), zeros_nT, zeros_nT))
    g_s[...] = g
    dA_ref[...] += dA
    dB_ref[...] = dB
    dC_ref[...] = dC

    valid = lax.broadcasted_iota(jnp.int32, (T, 1), 0) < steps   # rows past l hold garbage
    sB = sB_s[...]
    dy = dy_s[...]
    ddl = sB * u + sA_s[...]
    du = dl * sB
    if st.has_D:
        du = du + D_ref[...] * dy
        dD_ref[...] += jnp.sum(jnp.where(valid, dy * u, 0.0), axis=0, keepdims=True)
    if st.has_z:
        y = ys_s[...]
        if st.has_D:
            y = y + D_ref[...] * u
        dz_ref[...] = (dout * y * gate_grad).astype(dz_ref.dtype)
    if st.softplus:
        ddl = ddl * sigmoid(pre)
    if st.has_bias:
        dbias_ref[...] += jnp.sum(jnp.where(valid, ddl, 0.0), axis=0, keepdims=True)
    du_ref[...] = du.astype(du_ref.dtype)
    ddt_ref[...] = ddl.astype(ddt_ref.dtype)

    if st.has_h0:
        @pl.when(c == nc - 1)
        def _():
            dh0_ref[...] = g


def _backward(st: _Static, arrays, ckpt, dy, dfinal):
    u, delta, A, Bt, Ct, D, z, bias, h0, keep = arrays
    b, l, d, n, T, db = st.b, st.l, st.d, st.n, st.chunk, st.d_block
    nblk = d // db
    s = _specs(st, reverse=True)
    ins = [(u, s["btd"]), (delta, s["btd"]), (A, s["nd"]), (Bt, s["bgnl"]), (Ct, s["bgnl"]),
           (D, s["row"]), (z, s["btd"]), (bias, s["row"]), (keep, s["keep"]),
           (ckpt, s["ckpt"]), (dy, s["btd"]), (dfinal, s["bnd"])]
    ins = [(x, spec) for x, spec in ins if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in ins])
    outs = [(_sds(u.shape, u.dtype), s["btd"]),
            (_sds(delta.shape, delta.dtype), s["btd"])]
    if st.has_z:
        outs.append((_sds(z.shape, z.dtype), s["btd"]))
    outs += [(_sds((b, nblk, n, l), f32), s["part"])] * 2
    outs.append((_sds((b, n, d), f32), s["bnd"]))
    if st.has_D:
        outs.append((_sds((b, 1, d), f32), s["b1d"]))
    if st.has_bias:
        outs.append((_sds((b, 1, d), f32), s["b1d"]))
    if st.has_h0:
        outs.append((_sds((b, n, d), f32), s["bnd"]))
    scratch = ([pltpu.VMEM((n, db), f32), pltpu.VMEM((T + 1, n, db), f32)]
               + [pltpu.VMEM((T, db), f32)] * 6)
    res = iter(pl.pallas_call(
        functools.partial(_bwd_kernel, st),
        out_shape=[o for o, _ in outs],
        grid=(b, nblk, st.num_chunks),
        in_specs=[spec for _, spec in ins],
        out_specs=[spec for _, spec in outs],
        scratch_shapes=scratch,
        name="selective_scan_bwd",
        **_params(st),
    )(*(x for x, _ in ins)))
    du, ddelta = next(res), next(res)
    dz = _take(res, st.has_z)
    # per-block partials (b, nblk, n, l) -> summed per group, already Bt's (b, g, n, l)
    per_group = lambda p: p.reshape(b, st.g, nblk // st.g, n, l).sum(axis=2)
    dBt = per_group(next(res)).astype(Bt.dtype)
    dCt = per_group(next(res)).astype(Ct.dtype)
    dA = next(res).sum(0).astype(A.dtype)
    dD = next(res).sum(0).astype(D.dtype) if st.has_D else None
    dbias = next(res).sum(0).astype(bias.dtype) if st.has_bias else None
    dh0 = next(res).astype(h0.dtype) if st.has_h0 else None
    return du, ddelta, dA, dBt, dCt, dD, dz, dbias, dh0, None


_core = make_core(_forward, _backward)


# --------------------------------------------------------------------------- public
@functools.partial(jax.jit, static_argnames=("delta_softplus", "interpret", "config"))
def selective_scan_pallas_tpu(
    u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, segment_ids=None, interpret: bool = False,
    config: TpuConfig | None = None,
):
    """Selective scan on TPU (Pallas Mosaic); arguments and results as
    ``selective_scan_reference``.  ``interpret=True`` runs the kernels on any backend."""
    cfg = config or DEFAULT_CONFIG
    b, l, d = u.shape
    n = A.shape[-1]
    Bg = B if B.ndim == 4 else B[:, :, None, :]
    Cg = C if C.ndim == 4 else C[:, :, None, :]
    g = Bg.shape[2]
    chunk = l if l <= cfg.chunk else cfg.chunk
    st = _Static(
        b=b, l=l, d=d, n=n, g=g, softplus=bool(delta_softplus),
        has_D=D is not None, has_z=z is not None, has_bias=delta_bias is not None,
        has_h0=initial_state is not None, has_keep=segment_ids is not None,
        d_block=_choose_d_block(d // g, cfg.d_block), chunk=chunk, interpret=bool(interpret),
    )
    to_gnl = lambda x: jnp.transpose(x, (0, 2, 3, 1))          # (b, l, g, n) -> (b, g, n, l)
    row = lambda x: None if x is None else x.astype(f32)[None, :]
    keep = keep_from_segments(segment_ids, b, l)
    y, final = _core(
        st, u, delta, A.astype(f32).T, to_gnl(Bg), to_gnl(Cg), row(D), z, row(delta_bias),
        None if initial_state is None else jnp.swapaxes(initial_state.astype(f32), 1, 2),
        None if keep is None else keep[:, :, None],
    )
    return y, jnp.swapaxes(final, 1, 2)
