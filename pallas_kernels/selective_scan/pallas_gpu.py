"""Selective scan as Pallas kernels for NVIDIA GPUs, through Pallas' Triton lowering.

Why Triton and not Mosaic GPU: the scan is a sequential recurrence over time whose per-step
work is elementwise on a small (n, d_block) state plus two reductions; it uses neither the
tensor cores (wgmma) nor bulk tensor copies, which are what Mosaic GPU is for.  The Triton
lowering takes plain ``jax.numpy`` on refs, lays out registers itself, and runs under
``interpret=True`` on a CPU, which is how this file is tested.  It is selected explicitly
with ``compiler_params=pltriton.CompilerParams(...)`` (jax >= 0.9 defaults to Mosaic GPU
when no compiler params are given).  JAX 0.11 deprecates the Triton lowering; porting these
two kernels to Mosaic GPU (``plgpu.kernel``) is the way forward when it is removed.

Layout (channels last, like the public API):

* grid = (batch, d // d_block); a program (one warp) owns d_block channels of one batch row
  and keeps their (n, d_block) float32 state in registers for the whole sequence;
* per step it loads one row u[t], delta[t], z[t] (d_block values) and B[t], C[t] (n values,
  read as float32: they are small), and stores one row of y.  Steps run in unrolled groups
  (``unroll``); the next group's loads are issued before this group's compute and carried
  in registers (``prefetch``, ``prefetch_bc``), and a group's stores come after all its
  loads (a store may alias a later load as far as the compiler knows).  The scan is bound
  by memory latency, not bandwidth or arithmetic: on an H100 prefetching B / C as well cut
  the Jamba-layer forward from 2.44 to 1.44 ms (BENCHMARKS.md);
* exp(delta A) is computed as exp2((delta log2 e) A), one MUFU op per state element;
* 2-D blocks (A, checkpoints, initial state, d final) are assembled from n one-row loads:
  a vectorised 2-D load would make Triton split n over 8 threads for the whole kernel and
  repeat each step's per-channel work (softplus, gate) 8 times; from rows, the state keeps
  Triton's default layout (a thread holds one channel and half or all of its n states);
* under differentiation the forward also stores the state at the start of every ``chunk``
  steps (b * ceil(l / chunk) * d * n floats), never the per-step states.

Backward, per program, chunks in reverse.  Registers cannot be indexed at run time, so
the chunk's states are rebuilt in two levels: level 1 runs the chunk forward from its
checkpoint and keeps the state at every ``sub_chunk`` boundary in a small (chunk / sub_chunk,
n, d_block) register tensor (written and read with one-hot selects); level 2 takes the
sub-chunks in reverse, loads a sub-chunk's inputs, recomputes its states into a fully
unrolled Python list (static indices: registers), and runs the adjoint steps backwards over
them.  Each adjoint step produces du, d(delta), dz directly, and per-step partial sums of
dB / dC over the program's channels (reduced across channel blocks in XLA afterwards);
dA, dD, d(delta_bias) accumulate in registers and the gradient of the initial state is the
adjoint carry left after step 0.  The defaults (d_block 16, chunk 16, sub_chunk 4) are the
largest that compile without register spills (checked with ptxas for sm_90a).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .pallas_common import (
    LOG2E,
    f32,
    gate_and_grad,
    grouped_partials_to_dBC,
    keep_from_segments,
    largest_pow2_divisor,
    make_core,
    out_struct,
    next_pow2,
    sigmoid,
    softplus,
)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Block sizes of the GPU kernels (powers of two).

    fwd_d_block / fwd_num_warps / unroll: forward channels per program, warps, steps per
      unrolled group.  prefetch: load the next group's per-channel rows (u, delta, z) while
      computing this one; prefetch_bc: B and C too (2 * n more registers per step).
    bwd_d_block / bwd_num_warps: same for the backward.
    chunk: steps between stored checkpoints (forward under differentiation; backward chunk).
    sub_chunk: steps whose states the backward keeps in registers at once (divides chunk).
    """
    fwd_d_block: int = 16
    fwd_num_warps: int = 1
    unroll: int = 4
    prefetch: bool = True
    prefetch_bc: bool = True
    bwd_d_block: int = 16
    bwd_num_warps: int = 1
    chunk: int = 16
    sub_chunk: int = 4

    def __post_init__(self):
        for name in ("fwd_d_block", "fwd_num_warps", "unroll", "bwd_d_block", "bwd_num_warps",
                     "chunk", "sub_chunk"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GpuConfig.{name} must be a power of two, found {v}")
        if self.chunk % self.sub_chunk:
            raise ValueError("GpuConfig.sub_chunk must divide chunk")


DEFAULT_CONFIG = GpuConfig()


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""
    b: int
    l: int
    d: int
    n: int          # padded to a power of two
    g: int
    softplus: bool
    has_D: bool
    has_z: bool
    has_bias: bool
    has_h0: bool
    has_keep: bool
    fwd_block: int
    bwd_block: int
    cfg: GpuConfig
    interpret: bool


def _params(num_warps):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


# --------------------------------------------------------------------------- block specs
def _specs(st: _Static, db: int):
    """BlockSpecs for grid (b, d // db); B / C read the group of the program's channels."""
    l, n = st.l, st.n
    blocks_per_group = (st.d // st.g) // db
    return dict(
        bld=pl.BlockSpec((None, l, db), lambda i, j: (i, 0, j)),
        nd=pl.BlockSpec((n, db), lambda i, j: (0, j)),
        blgn=pl.BlockSpec((None, l, None, n), lambda i, j: (i, 0, lax.div(j, blocks_per_group), 0)),
        d=pl.BlockSpec((db,), lambda i, j: (j,)),
        bnd=pl.BlockSpec((None, n, db), lambda i, j: (i, 0, j)),
        bl=pl.BlockSpec((None, l), lambda i, j: (i, 0)),
        bd=pl.BlockSpec((None, db), lambda i, j: (i, j)),
        ckpt=pl.BlockSpec((None, pl.cdiv(l, st.cfg.chunk), n, db), lambda i, j: (i, 0, 0, j)),
        part=pl.BlockSpec((None, None, l, n), lambda i, j: (i, j, 0, 0)),
    )


def _take(it, flag):
    return next(it) if flag else None


def _load_rows(ref, n, db, *prefix):
    """A float32 (n, db) block assembled from n one-row loads.  A single 2-D load would be
    vectorised along d and make Triton split n over 8 threads for the whole kernel (the
    per-channel work of a step is then repeated 8 times); built from rows, the state keeps
    Triton's default layout: each thread holds one channel and half of its n states."""
    rows = lax.broadcasted_iota(jnp.int32, (n, db), 0)
    out = jnp.zeros((n, db), f32)
    for i in range(n):
        out = jnp.where(rows == i, ref[(*prefix, i, slice(None))].astype(f32)[None, :], out)
    return out


# --------------------------------------------------------------------------- forward
def _fwd_kernel(st: _Static, save: bool, *refs):
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref = (next(it) for _ in range(5))
    D_ref, z_ref, bias_ref, h0_ref, keep_ref = (
        _take(it, f) for f in (st.has_D, st.has_z, st.has_bias, st.has_h0, st.has_keep))
    y_ref, final_ref = next(it), next(it)
    ck_ref = _take(it, save)

    n, db, K1, U = st.n, st.fwd_block, st.cfg.chunk, st.cfg.unroll
    A = _load_rows(A_ref, n, db)
    Dv = D_ref[...].astype(f32) if st.has_D else None
    bias = bias_ref[...].astype(f32) if st.has_bias else None

    def load(t):
        """Step t's per-channel inputs, as stored (t past the end is clamped: prefetch
        overrun); with prefetch_bc also B[t], C[t]."""
        t = jnp.minimum(t, st.l - 1)
        bc = (B_ref[t, :], C_ref[t, :]) if st.cfg.prefetch_bc else None
        return (u_ref[t, :], dt_ref[t, :], z_ref[t, :] if st.has_z else None,
                keep_ref[t] if st.has_keep else None, bc)

    def step(v, Bt, Ct, h):
        u, pre, zt, keep, _ = v
        u = u.astype(f32)
        pre = pre.astype(f32)
        if bias is not None:
            pre = pre + bias
        dl = softplus(pre) if st.softplus else pre
        a = jnp.exp2((dl * LOG2E)[None, :] * A)               # exp(dl A), (n, db)
        if keep is not None:
            a = a * keep
        h = a * h + Bt[:, None] * (dl * u)[None, :]
        y = jnp.sum(h * Ct[:, None], axis=0)
        if st.has_D:
            y = y + Dv * u
        if zt is not None:
            zt = zt.astype(f32)
            y = y * (zt * sigmoid(zt))
        return h, y.astype(y_ref.dtype)

    def group_body(t0, count, vals, h):
        """``count`` steps from t0 with their per-channel inputs ``vals``: B / C loads
        first, then the recurrence, then the stores (a store may alias any later load, so
        none sits between the group's loads)."""
        bc = [vals[k][4] if vals[k][4] is not None else (B_ref[t0 + k, :], C_ref[t0 + k, :])
              for k in range(count)]
        ys = []
        for k in range(count):
            h, y = step(vals[k], *bc[k], h)
            ys.append(y)
        for k in range(count):
            y_ref[t0 + k, :] = ys[k]
        return h

    def run(t0, count, h):
        """``count`` (static) steps from t0 in unrolled groups of U.  With ``prefetch`` the
        next group's per-channel rows are loaded before this group's compute and carried
        in registers (one register per row), overlapping their latency with a group."""
        groups, rem = divmod(count, U)
        if groups and st.cfg.prefetch:
            def group(i, carry):
                h, cur = carry
                nxt = [load(t0 + (i + 1) * U + k) for k in range(U)]
                return group_body(t0 + i * U, U, cur, h), nxt
            h, _ = lax.fori_loop(0, groups, group, (h, [load(t0 + k) for k in range(U)]))
        elif groups:
            def group(i, h):
                return group_body(t0 + i * U, U, [load(t0 + i * U + k) for k in range(U)], h)
            h = lax.fori_loop(0, groups, group, h)
        if rem:
            tr = t0 + groups * U
            h = group_body(tr, rem, [load(tr + k) for k in range(rem)], h)
        return h

    h = _load_rows(h0_ref, n, db) if st.has_h0 else jnp.zeros((n, db), f32)
    if not save:
        h = run(0, st.l, h)
    else:
        full, r = divmod(st.l, K1)

        def chunk(c, h):
            ck_ref[c, :, :] = h
            return run(c * K1, K1, h)

        if full:
            h = lax.fori_loop(0, full, chunk, h)
        if r:
            ck_ref[full, :, :] = h
            h = run(full * K1, r, h)
    final_ref[...] = h


def _forward(st: _Static, arrays, save: bool):
    u, delta, A, B, C, D, z, bias, h0, keep = arrays
    b, l, d, n, db = st.b, st.l, st.d, st.n, st.fwd_block
    s = _specs(st, db)
    present = [(u, s["bld"]), (delta, s["bld"]), (A, s["nd"]), (B, s["blgn"]), (C, s["blgn"]),
               (D, s["d"]), (z, s["bld"]), (bias, s["d"]), (h0, s["bnd"]), (keep, s["bl"])]
    present = [(x, spec) for x, spec in present if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in present])
    out_shape = [_sds((b, l, d), u.dtype), _sds((b, n, d), f32)]
    out_specs = [s["bld"], s["bnd"]]
    if save:
        out_shape.append(_sds((b, pl.cdiv(l, st.cfg.chunk), n, d), f32))
        out_specs.append(s["ckpt"])
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, st, save),
        out_shape=out_shape,
        grid=(b, d // db),
        in_specs=[spec for _, spec in present],
        out_specs=out_specs,
        compiler_params=_params(st.cfg.fwd_num_warps),
        interpret=st.interpret,
        name="selective_scan_fwd",
    )(*(x for x, _ in present))
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

    n, db = st.n, st.bwd_block
    K1, K2 = st.cfg.chunk, st.cfg.sub_chunk
    M = K1 // K2
    A = _load_rows(A_ref, n, db)
    Dv = D_ref[...].astype(f32) if st.has_D else None
    bias = bias_ref[...].astype(f32) if st.has_bias else None
    sub_index = lax.broadcasted_iota(jnp.int32, (M, 1, 1), 0)

    def load(t):
        """Inputs of the forward step t, as stored."""
        return (u_ref[t, :], dt_ref[t, :], B_ref[t, :], keep_ref[t] if st.has_keep else None)

    def load_adjoint(t):
        """Inputs that only the adjoint step t reads."""
        return C_ref[t, :], dout_ref[t, :], (z_ref[t, :] if st.has_z else None)

    def recompute(v, h):
        """One forward step from loaded inputs; returns the new state and what the
        adjoint step reuses."""
        u, pre, Bt, keep = v
        u = u.astype(f32)
        pre = pre.astype(f32)
        if bias is not None:
            pre = pre + bias
        dl = softplus(pre) if st.softplus else pre
        x = dl * u
        Bt = Bt.astype(f32)
        a = jnp.exp2((dl * LOG2E)[None, :] * A)
        if keep is not None:
            a = a * keep
        return a * h + Bt[:, None] * x[None, :], (u, pre, dl, x, Bt, a)

    def advance(t0, count, h):
        vals = [load(t0 + k) for k in range(count)]
        for k in range(count):
            h, _ = recompute(vals[k], h)
        return h

    def adjoint(t, saved, adj, h_prev, h, carry):
        g, dA, dD, dbias = carry
        u, pre, dl, x, Bt, a = saved
        Ct, dout, zt = adj
        Ct = Ct.astype(f32)
        dout = dout.astype(f32)
        if zt is not None:
            gate, gate_grad = gate_and_grad(zt.astype(f32))
            y = jnp.sum(h * Ct[:, None], axis=0)
            if st.has_D:
                y = y + Dv * u
            dz_ref[t, :] = (dout * y * gate_grad).astype(dz_ref.dtype)
            dy = dout * gate
        else:
            dy = dout
        dh = g + Ct[:, None] * dy[None, :]                    # total gradient at h_t
        dC_ref[t, :] = jnp.sum(h * dy[None, :], axis=1)
        dB_ref[t, :] = jnp.sum(dh * x[None, :], axis=1)
        sB = jnp.sum(dh * Bt[:, None], axis=0)                # (db,)
        q = dh * (a * h_prev)                                 # d(loss)/d(log a) per element
        dA = dA + q * dl[None, :]
        ddl = sB * u + jnp.sum(q * A, axis=0)
        du = dl * sB
        if st.has_D:
            du = du + Dv * dy
            dD = dD + dy * u
        du_ref[t, :] = du.astype(du_ref.dtype)
        if st.softplus:
            ddl = ddl * sigmoid(pre)
        if st.has_bias:
            dbias = dbias + ddl
        ddt_ref[t, :] = ddl.astype(ddt_ref.dtype)
        return a * dh, dA, dD, dbias

    def sub_chunk_backward(t0, count, h, carry):
        """Recompute ``count`` (static) states from h (state before t0), then adjoint them.
        Every load of the sub-chunk is issued before its first store."""
        vals = [load(t0 + k) for k in range(count)]
        adj = [load_adjoint(t0 + k) for k in range(count)]
        hs, saved = [h], []
        for k in range(count):
            h, s = recompute(vals[k], h)
            hs.append(h)
            saved.append(s)
        for k in reversed(range(count)):
            carry = adjoint(t0 + k, saved[k], adj[k], hs[k], hs[k + 1], carry)
        return carry

    def chunk_backward(t0, c, full_subs, tail, carry):
        """Chunk c (starting at t0): ``full_subs`` sub-chunks of K2 steps, then ``tail`` steps."""
        h = _load_rows(ck_ref, n, db, c)
        subs = jnp.where(sub_index == 0, h[None], jnp.zeros((M, n, db), f32))

        def level1(m, hs):
            h, subs = hs
            h = advance(t0 + m * K2, K2, h)
            return h, jnp.where(sub_index == m + 1, h[None], subs)

        advances = full_subs - 1 + (1 if tail else 0)
        if advances > 0:
            h, subs = lax.fori_loop(0, advances, level1, (h, subs))
        if tail:
            carry = sub_chunk_backward(t0 + full_subs * K2, tail, h, carry)

        def level2(i, carry):
            m = full_subs - 1 - i
            h = jnp.sum(jnp.where(sub_index == m, subs, 0.0), axis=0)
            return sub_chunk_backward(t0 + m * K2, K2, h, carry)

        if full_subs:
            carry = lax.fori_loop(0, full_subs, level2, carry)
        return carry

    zeros_d = jnp.zeros((db,), f32)
    carry = (_load_rows(dfinal_ref, n, db), jnp.zeros((n, db), f32), zeros_d, zeros_d)
    full, r = divmod(st.l, K1)
    if r:
        carry = chunk_backward(full * K1, full, r // K2, r % K2, carry)
    if full:
        def chunk(i, carry):
            c = full - 1 - i
            return chunk_backward(c * K1, c, M, 0, carry)
        carry = lax.fori_loop(0, full, chunk, carry)
    g, dA, dD, dbias = carry
    dA_ref[...] = dA
    if st.has_D:
        dD_ref[...] = dD
    if st.has_bias:
        dbias_ref[...] = dbias
    if st.has_h0:
        dh0_ref[...] = g


def _backward(st: _Static, arrays, ckpt, dy, dfinal):
    u, delta, A, B, C, D, z, bias, h0, keep = arrays
    b, l, d, n, db = st.b, st.l, st.d, st.n, st.bwd_block
    nblk = d // db
    s = _specs(st, db)
    ins = [(u, s["bld"]), (delta, s["bld"]), (A, s["nd"]), (B, s["blgn"]), (C, s["blgn"]),
           (D, s["d"]), (z, s["bld"]), (bias, s["d"]), (keep, s["bl"]),
           (ckpt, s["ckpt"]), (dy, s["bld"]), (dfinal, s["bnd"])]
    ins = [(x, spec) for x, spec in ins if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in ins])
    outs = [(_sds(u.shape, u.dtype), s["bld"]),
            (_sds(delta.shape, delta.dtype), s["bld"])]
    if st.has_z:
        outs.append((_sds(z.shape, z.dtype), s["bld"]))
    outs += [(_sds((b, nblk, l, n), f32), s["part"])] * 2
    outs.append((_sds((b, n, d), f32), s["bnd"]))
    if st.has_D:
        outs.append((_sds((b, d), f32), s["bd"]))
    if st.has_bias:
        outs.append((_sds((b, d), f32), s["bd"]))
    if st.has_h0:
        outs.append((_sds((b, n, d), f32), s["bnd"]))
    res = iter(pl.pallas_call(
        functools.partial(_bwd_kernel, st),
        out_shape=[o for o, _ in outs],
        grid=(b, nblk),
        in_specs=[spec for _, spec in ins],
        out_specs=[spec for _, spec in outs],
        compiler_params=_params(st.cfg.bwd_num_warps),
        interpret=st.interpret,
        name="selective_scan_bwd",
    )(*(x for x, _ in ins)))
    du, ddelta = next(res), next(res)
    dz = _take(res, st.has_z)
    dB = grouped_partials_to_dBC(next(res), st.g).astype(B.dtype)
    dC = grouped_partials_to_dBC(next(res), st.g).astype(C.dtype)
    dA = next(res).sum(0).astype(A.dtype)
    dD = next(res).sum(0).astype(D.dtype) if st.has_D else None
    dbias = next(res).sum(0).astype(bias.dtype) if st.has_bias else None
    dh0 = next(res).astype(h0.dtype) if st.has_h0 else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, None


_core = make_core(_forward, _backward)


# --------------------------------------------------------------------------- public
@functools.partial(jax.jit, static_argnames=("delta_softplus", "interpret", "config"))
def selective_scan_pallas_gpu(
    u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, segment_ids=None, interpret: bool = False,
    config: GpuConfig | None = None,
):
    """Selective scan on GPU (Pallas Triton); arguments and results as
    ``selective_scan_reference``.  ``interpret=True`` runs the kernels on any backend."""
    cfg = config or DEFAULT_CONFIG
    b, l, d = u.shape
    n = A.shape[-1]
    Bg = B if B.ndim == 4 else B[:, :, None, :]
    Cg = C if C.ndim == 4 else C[:, :, None, :]
    g = Bg.shape[2]
    n_pad = next_pow2(n)   # Triton tensors have power-of-two sizes; padded states stay 0
    pad_n = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)])
    A_nd = pad_n(A.astype(f32)).T                                      # (n, d)
    h0 = None if initial_state is None else jnp.swapaxes(pad_n(initial_state.astype(f32)), 1, 2)
    st = _Static(
        b=b, l=l, d=d, n=n_pad, g=g, softplus=bool(delta_softplus),
        has_D=D is not None, has_z=z is not None, has_bias=delta_bias is not None,
        has_h0=h0 is not None, has_keep=segment_ids is not None,
        fwd_block=largest_pow2_divisor(d // g, cfg.fwd_d_block),
        bwd_block=largest_pow2_divisor(d // g, cfg.bwd_d_block),
        cfg=cfg, interpret=bool(interpret),
    )
    # B / C are small (b * l * g * n): reading them as float32 spares the kernel unpacking
    # 2 * n bf16 values per step and thread.
    y, final = _core(
        st, u, delta, A_nd, pad_n(Bg.astype(f32)), pad_n(Cg.astype(f32)),
        None if D is None else D.astype(f32), z,
        None if delta_bias is None else delta_bias.astype(f32),
        h0, keep_from_segments(segment_ids, b, l),
    )
    return y, jnp.swapaxes(final, 1, 2)[:, :, :n]
