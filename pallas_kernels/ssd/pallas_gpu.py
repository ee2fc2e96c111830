"""Pallas SSD kernels for GPUs, through Pallas' Triton lowering.

Why Triton and not Mosaic GPU (the default Pallas GPU lowering since JAX 0.9):

* it is testable here: Triton-style kernels (``pl.load``-like ref indexing, ``jnp.dot``) run in
  Pallas' ``interpret=True`` mode on a CPU, which is how ``tests/test_ssd_pallas.py`` checks every
  value and gradient; Mosaic GPU has no CPU interpreter in JAX 0.10;
* the kernels are small-tile sequential loops (a (p, n) state carried on chip across chunks,
  64x64 and 64x128 products with exp/mask work in between): Triton's compiler already turns
  ``tt.dot`` into Hopper ``wgmma`` and software-pipelines the chunk loads (``num_stages``), while
  Mosaic GPU would have us hand-schedule warpgroups, barriers and TMA for modest gains;
* the same lowering also targets ROCm (not tried here).
The price: the Triton lowering is deprecated from JAX 0.11 on and must be selected explicitly,
which ``compiler_params=pltriton.CompilerParams(...)`` does (also in 0.11).

Kernels (the plan and the math are in :mod:`pallas_kernels.ssd.pallas_common`):

* ``_fwd_kernel``, grid (b, h, p / pb, S): the state (pb, n) float32 lives in registers through a
  ``fori_loop`` over chunks; per chunk C.B^T, the decay matrix, two products for y and one for
  the state update.  D and the z gate are applied before the store.
* ``_dstate_kernel``, grid (b, h, p / pb, S): the reverse sweep of the state gradient.
* ``_split_state_kernel``: with the sequence split in S parts (few sequences and heads), the
  zero-start state of each part, chained in XLA into the state entering each part.
* ``_chunk_grad_kernel``, grid (b, chunks, g * splits): per chunk, loops over the heads of one
  group (or a 1/splits share of them), summing dB/dC in registers.
Layouts are the API's (channels last); only dt and its cumsum are moved to (b, h, l).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu_splits import chain_splits, effective_splits, num_sms
from pallas_kernels.ssd import pallas_common as pc
from pallas_kernels.ssd.reference import DEFAULT_DT_LIMIT

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GpuOptions:
    """Block sizes and launch parameters (see ``default_options``)."""
    block_p: int                 # pb: head-dim block of the forward / state sweep
    head_splits: int             # programs per group in the chunk-gradient kernel
    seq_splits: int = 1          # S: programs along the sequence in the forward / state sweep
    fwd_warps: int = 4
    fwd_stages: int = 2
    dstate_warps: int = 4
    grad_warps: int = 8
    grad_stages: int = 1
    interpret: bool = False


def default_block_t(chunk_size: int) -> int:
    """The kernel's chunk T: chunk_size rounded down to a power of two, within [16, 64].

    The result does not depend on T (up to rounding): T = 64 keeps the (T, T) tiles in
    registers and needs fewer flops per position than mamba_ssm's usual 256.
    """
    t = 16
    while t * 2 <= min(chunk_size, 64):
        t *= 2
    return t


def default_options(b, h, p, g, nc, interpret=False) -> GpuOptions:
    """Tuning table / heuristic.  Forward and state sweep: a sequential walk over chunks per
    (batch, head, p-block) program, so aim for >= 1 program per SM: split the sequence (in
    powers of two, keeping >= 8 chunks per split), then p.  Chunk gradients: split a group's
    heads until the grid has ~4 programs per SM.

    H100 sweep (BENCHMARKS.md, T = 64, p = 64): b h = 64 (l = 16384) is fastest at S = 4
    (S = 8, 16 and p-blocks of 32 slower); b h = 256, 320, 640 at S = 1 (S = 2, 4 slower)."""
    sms = num_sms()
    S = 1
    while b * h * S < sms and nc % (2 * S) == 0 and nc // (2 * S) >= 8:
        S *= 2
    pb = p // 2 if b * h * S < sms and p >= 32 else p
    r = h // g
    splits = 1
    while b * nc * g * splits < 4 * sms and r % (splits * 2) == 0 and r // (splits * 2) >= 2:
        splits *= 2
    return GpuOptions(block_p=pb, head_splits=splits, seq_splits=S, interpret=interpret)


def _params(warps, stages):
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def _unpack(refs, names):
    return dict(zip(names, refs))


# --------------------------------------------------------------------------- sequence splits
# A (batch, head, p-block) program walks its chunks in order, so with few sequences and heads
# (b = 1, l = 16384: 64 x 2 programs on 132 SMs) the walk, not the card, sets the time.  With
# ``seq_splits = S`` each program walks only nc / S chunks: a first kernel computes, per split,
# the state its chunks produce from a zero start (the forward: no outputs, one product per
# chunk; the backward: the same for the state gradient, walking backwards), a tiny XLA chain
# over the splits turns those into the true state entering each split, and the usual kernel
# then runs all splits in parallel from those states.
def _split_keep(cfg: pc.Config, P: pc.Prepared, S: int):
    """(b, S, h) float32: what a split does to the state entering it, ``exp(sum of its chunks'
    log-decays)``, or 0 where a segment starts inside the split (the state is reset)."""
    b, h, L = P.cum.shape
    T = cfg.block_t
    ncs = L // T // S
    keep = jnp.exp(P.cum[:, :, T - 1::T].reshape(b, h, S, ncs).sum(axis=-1))
    keep = jnp.swapaxes(keep, 1, 2)
    if cfg.has_segments:
        sid_end = P.sid[:, ncs * T - 1::ncs * T]                        # (b, S)
        keep = jnp.where((sid_end == P.sid_prev[:, ::ncs])[:, :, None], keep, 0.0)
    return keep


def _specs(cfg: pc.Config, P: pc.Prepared, pb: int, ncs: int, split_of=lambda s: s):
    """BlockSpecs of the per-position inputs for a grid (b, h, p / pb, splits)."""
    L, n = P.x.shape[1], P.B.shape[-1]
    T, R = cfg.block_t, cfg.heads_per_group
    Ls = ncs * T
    rows = lambda shape: pl.BlockSpec(shape, lambda i, j, k, s: (i, split_of(s), j, k))
    return dict(
        x=rows((None, Ls, None, pb)),
        BC=pl.BlockSpec((None, Ls, None, n), lambda i, j, k, s: (i, split_of(s), j // R, 0)),
        hl=pl.BlockSpec((None, None, Ls), lambda i, j, k, s: (i, j, split_of(s))),
        sid=pl.BlockSpec((None, Ls), lambda i, j, k, s: (i, split_of(s))),
        sid_prev=pl.BlockSpec((None, L // T), lambda i, j, k, s: (i, 0)),
        state=pl.BlockSpec((None, None, None, pb, n), lambda i, j, k, s: (i, s, j, k, 0)),
    )


def _chunk_segments(cfg, r, rows, chunk):
    if not cfg.has_segments:
        return None
    sid = r["sid"][rows]
    return pc.segment_masks(sid[:, None], sid[None, :], r["sid_prev"][chunk])


def _split_state_kernel(*refs, cfg: pc.Config, names, ncs: int, reverse: bool, first_split: int):
    """Zero-start state (forward) or state gradient (reverse) over one split's chunks."""
    r = _unpack(refs, names)
    T, prec = cfg.block_t, cfg.precision
    base = (pl.program_id(3) + first_split) * ncs

    def body(i, state):
        c = ncs - 1 - i if reverse else i
        rows = pl.ds(c * T, T)
        cum = r["cum"][rows]
        seg = _chunk_segments(cfg, r, rows, base + c)
        if reverse:
            return pc.dstate_step(state, r["dy"][rows, :], r["C"][rows, :], cum[:, None],
                                  cum[None, :], seg, prec)
        return pc.chunk_state_step(r["x"][rows, :], r["B"][rows, :], r["dt"][rows][:, None],
                                   cum[:, None], cum[None, :], state, seg, prec)

    r["local"][...] = jax.lax.fori_loop(0, ncs, body, jnp.zeros(r["local"].shape, f32))


def _split_boundary_states(cfg: pc.Config, P: pc.Prepared, S: int, first, dy=None):
    """The state entering every split (forward, ``dy=None``) or the state gradient leaving every
    split (``dy`` given), (b, S, h, p, n) float32, from ``first``: the state entering split 0
    or the gradient leaving split S-1."""
    opt: GpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    n = P.B.shape[-1]
    pb, nc = opt.block_p, L // cfg.block_t
    ncs = nc // S
    reverse = dy is not None
    first_split = 1 if reverse else 0
    sp = _specs(cfg, P, pb, ncs, split_of=lambda s: s + first_split)
    inputs = ([("dy", dy, sp["x"]), ("C", P.C, sp["BC"])] if reverse else
              [("x", P.x, sp["x"]), ("B", P.B, sp["BC"]), ("dt", P.dt, sp["hl"])])
    inputs.append(("cum", P.cum, sp["hl"]))
    if cfg.has_segments:
        inputs += [("sid", P.sid, sp["sid"]), ("sid_prev", P.sid_prev, sp["sid_prev"])]
    names, args, specs = (list(t) for t in zip(*inputs))
    kernel = functools.partial(_split_state_kernel, cfg=cfg, names=tuple(names + ["local"]),
                               ncs=ncs, reverse=reverse, first_split=first_split)
    local = pl.pallas_call(
        kernel, grid=(b, h, p // pb, S - 1), in_specs=specs, out_specs=sp["state"],
        out_shape=pc.out_struct((b, S - 1, h, p, n), f32, args),
        compiler_params=_params(opt.dstate_warps if reverse else opt.fwd_warps, opt.fwd_stages),
        interpret=opt.interpret, name="ssd_bwd_split_dstate" if reverse else "ssd_fwd_split_state",
    )(*args)
    keep = _split_keep(cfg, P, S)
    keep = (keep[:, 1:] if reverse else keep[:, :-1])[:, :, :, None, None]
    return chain_splits(local, keep, first, reverse)


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: pc.Config, names, ncs: int, save: bool, has_init: bool):
    r = _unpack(refs, names)
    T = cfg.block_t
    prec = cfg.precision
    base = pl.program_id(3) * ncs
    pb, n = r["final"].shape
    state0 = r["init"][...].astype(f32) if has_init else jnp.zeros((pb, n), f32)
    D_row = r["D"][...][None, :] if cfg.has_D else None

    def body(c, state):
        rows = pl.ds(c * T, T)
        x = r["x"][rows, :]
        dt = r["dt"][rows]
        cum = r["cum"][rows]
        seg = _chunk_segments(cfg, r, rows, base + c)
        if save:
            r["states"][c] = state.astype(r["states"].dtype)
        y, state = pc.chunk_forward(x, r["B"][rows, :], r["C"][rows, :], dt[:, None],
                                    dt[None, :], cum[:, None], cum[None, :], state, seg, prec)
        if cfg.has_D:
            y = y + D_row * x.astype(f32)
        if cfg.has_z:
            if save:
                r["y_pre"][rows, :] = y.astype(r["y_pre"].dtype)
            zf = r["z"][rows, :].astype(f32)
            y = y * zf * pc.sigmoid(zf)
        r["y"][rows, :] = y.astype(r["y"].dtype)
        return state

    r["final"][...] = jax.lax.fori_loop(0, ncs, body, state0)


def forward(cfg: pc.Config, P: pc.Prepared, save: bool):
    opt: GpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    n = P.B.shape[-1]
    T, pb = cfg.block_t, opt.block_p
    nc = L // T
    S = effective_splits(opt.seq_splits, nc)
    ncs = nc // S
    init = P.init
    if S > 1:
        first = init if init is not None else jnp.zeros((b, h, p, n), f32)
        init = _split_boundary_states(cfg, P, S, first)                  # (b, S, h, p, n)
    elif init is not None:
        init = init[:, None]
    sp = _specs(cfg, P, pb, ncs)
    names, args, specs = [], [], []

    def add(name, arr, spec):
        names.append(name), args.append(arr), specs.append(spec)

    add("x", P.x, sp["x"])
    add("B", P.B, sp["BC"])
    add("C", P.C, sp["BC"])
    add("dt", P.dt, sp["hl"])
    add("cum", P.cum, sp["hl"])
    if cfg.has_segments:
        add("sid", P.sid, sp["sid"])
        add("sid_prev", P.sid_prev, sp["sid_prev"])
    if init is not None:
        add("init", init, sp["state"])
    if cfg.has_D:
        add("D", P.D, pl.BlockSpec((None, pb), lambda i, j, k, s: (j, k)))
    if cfg.has_z:
        add("z", P.z, sp["x"])

    struct = functools.partial(pc.out_struct, inputs=args)
    out_names = ["y", "final"]
    out_shapes = [struct((b, L, h, p), cfg.op_dtype), struct((b, S, h, p, n), f32)]
    out_specs = [sp["x"], sp["state"]]
    if save:
        out_names.append("states")
        out_shapes.append(struct((b, nc, h, p, n), cfg.state_dtype))
        out_specs.append(pl.BlockSpec((None, ncs, None, pb, n),
                                      lambda i, j, k, s: (i, s, j, k, 0)))
        if cfg.has_z:
            out_names.append("y_pre")
            out_shapes.append(struct((b, L, h, p), cfg.op_dtype))
            out_specs.append(sp["x"])

    kernel = functools.partial(_fwd_kernel, cfg=cfg, names=tuple(names + out_names), ncs=ncs,
                               save=save, has_init=init is not None)
    outs = pl.pallas_call(
        kernel, grid=(b, h, p // pb, S), in_specs=specs, out_specs=out_specs,
        out_shape=out_shapes, compiler_params=_params(opt.fwd_warps, opt.fwd_stages),
        interpret=opt.interpret, name="ssd_fwd",
    )(*args)
    outs = dict(zip(out_names, outs))
    return outs["y"], outs["final"][:, -1], outs.get("states"), outs.get("y_pre")


# --------------------------------------------------------------------------- backward: state sweep
def _dstate_kernel(*refs, cfg: pc.Config, names, ncs: int):
    r = _unpack(refs, names)
    T = cfg.block_t
    prec = cfg.precision
    base = pl.program_id(3) * ncs

    def body(i, dstate):
        c = ncs - 1 - i
        rows = pl.ds(c * T, T)
        r["dstates"][c] = dstate.astype(r["dstates"].dtype)
        cum = r["cum"][rows]
        seg = _chunk_segments(cfg, r, rows, base + c)
        return pc.dstate_step(dstate, r["dy"][rows, :], r["C"][rows, :], cum[:, None],
                              cum[None, :], seg, prec)

    r["dinit"][...] = jax.lax.fori_loop(0, ncs, body, r["dfinal"][...].astype(f32))


def backward_dstates(cfg: pc.Config, P: pc.Prepared, dy, dfinal):
    opt: GpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    n = P.B.shape[-1]
    pb = opt.block_p
    nc = L // cfg.block_t
    S = effective_splits(opt.seq_splits, nc)
    ncs = nc // S
    dleave = (_split_boundary_states(cfg, P, S, dfinal, dy=dy) if S > 1
              else dfinal[:, None])                                      # (b, S, h, p, n)
    sp = _specs(cfg, P, pb, ncs)
    names, args, specs = [], [], []

    def add(name, arr, spec):
        names.append(name), args.append(arr), specs.append(spec)

    add("dy", dy, sp["x"])
    add("C", P.C, sp["BC"])
    add("cum", P.cum, sp["hl"])
    if cfg.has_segments:
        add("sid", P.sid, sp["sid"])
        add("sid_prev", P.sid_prev, sp["sid_prev"])
    add("dfinal", dleave, sp["state"])
    out_names = ["dstates", "dinit"]
    struct = functools.partial(pc.out_struct, inputs=args)
    kernel = functools.partial(_dstate_kernel, cfg=cfg, names=tuple(names + out_names), ncs=ncs)
    dstates, dinit = pl.pallas_call(
        kernel, grid=(b, h, p // pb, S), in_specs=specs,
        out_specs=[pl.BlockSpec((None, ncs, None, pb, n), lambda i, j, k, s: (i, s, j, k, 0)),
                   sp["state"]],
        out_shape=[struct((b, nc, h, p, n), cfg.state_dtype), struct((b, S, h, p, n), f32)],
        compiler_params=_params(opt.dstate_warps, opt.fwd_stages), interpret=opt.interpret,
        name="ssd_bwd_dstate",
    )(*args)
    return dstates, dinit[:, 0]


# --------------------------------------------------------------------------- backward: chunk grads
def _chunk_grad_kernel(*refs, cfg: pc.Config, names, heads: int):
    r = _unpack(refs, names)
    T = cfg.block_t
    prec = cfg.precision
    c = pl.program_id(1)
    B = r["B"][...]
    C = r["C"][...]
    n = B.shape[1]
    CB = pc.mm(C, B, "nt", prec)
    seg = None
    if cfg.has_segments:
        sid = r["sid"][...]
        seg = pc.segment_masks(sid[:, None], sid[None, :], r["sid_prev"][c])

    def head(j, acc):
        W_sum, dB, dC = acc
        x = r["x"][:, j, :]
        dy = r["dy"][:, j, :]
        dt = r["dt"][j, :]
        cum = r["cum"][j, :]
        hg = pc.chunk_backward_head(x, dy, B, C, CB, dt[:, None], dt[None, :], cum[:, None],
                                    cum[None, :], r["states"][j], r["dstates"][j], seg, prec)
        dx = hg.dx
        if cfg.has_D:
            dx = dx + r["D"][j, :][None, :] * dy.astype(f32)
            r["dD"][j, :] = jnp.sum(dy.astype(f32) * x.astype(f32), axis=0)
        r["dx"][:, j, :] = dx.astype(r["dx"].dtype)
        r["ddt"][j, :] = hg.ddt.reshape(T)
        r["dcum"][j, :] = hg.dcum_col.reshape(T) + hg.dcum_row.reshape(T)
        return W_sum + hg.W, dB + hg.dB, dC + hg.dC

    zeros_tn = jnp.zeros((T, n), f32)
    W_sum, dB, dC = jax.lax.fori_loop(0, heads, head, (jnp.zeros((T, T), f32), zeros_tn, zeros_tn))
    dB_intra, dC_intra = pc.group_grads_from_scores(W_sum, B, C, prec)
    r["dB"][...] = dB + dB_intra
    r["dC"][...] = dC + dC_intra


def backward_chunks(cfg: pc.Config, P: pc.Prepared, dy, states, dstates):
    opt: GpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    g, n = P.B.shape[2:]
    T, R, S = cfg.block_t, cfg.heads_per_group, opt.head_splits
    nc = L // T
    hs = R // S                                           # heads per program
    grid = (b, nc, g * S)                                 # program k: heads [k*hs, (k+1)*hs)
    names, args, specs = [], [], []

    def add(name, arr, spec):
        names.append(name), args.append(arr), specs.append(spec)

    xs_spec = pl.BlockSpec((None, T, hs, p), lambda i, c, k: (i, c, k, 0))
    hl_spec = pl.BlockSpec((None, hs, T), lambda i, c, k: (i, k, c))
    bc_spec = pl.BlockSpec((None, T, None, n), lambda i, c, k: (i, c, k // S, 0))
    st_spec = pl.BlockSpec((None, None, hs, p, n), lambda i, c, k: (i, c, k, 0, 0))
    add("x", P.x, xs_spec)
    add("dy", dy, xs_spec)
    add("B", P.B, bc_spec)
    add("C", P.C, bc_spec)
    add("dt", P.dt, hl_spec)
    add("cum", P.cum, hl_spec)
    add("states", states, st_spec)
    add("dstates", dstates, st_spec)
    if cfg.has_segments:
        add("sid", P.sid, pl.BlockSpec((None, T), lambda i, c, k: (i, c)))
        add("sid_prev", P.sid_prev, pl.BlockSpec((None, nc), lambda i, c, k: (i, 0)))
    if cfg.has_D:
        add("D", P.D, pl.BlockSpec((hs, p), lambda i, c, k: (k, 0)))

    struct = functools.partial(pc.out_struct, inputs=args)
    out_names = ["dx", "ddt", "dcum", "dB", "dC"]
    part_spec = pl.BlockSpec((None, T, None, n), lambda i, c, k: (i, c, k, 0))
    out_shapes = [struct((b, L, h, p), cfg.op_dtype),
                  struct((b, h, L), f32),
                  struct((b, h, L), f32),
                  struct((b, L, g * S, n), f32),
                  struct((b, L, g * S, n), f32)]
    out_specs = [xs_spec, hl_spec, hl_spec, part_spec, part_spec]
    if cfg.has_D:
        out_names.append("dD")
        out_shapes.append(struct((b, nc, h, p), f32))
        out_specs.append(pl.BlockSpec((None, None, hs, p), lambda i, c, k: (i, c, k, 0)))

    kernel = functools.partial(_chunk_grad_kernel, cfg=cfg, names=tuple(names + out_names),
                               heads=hs)
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shapes,
        compiler_params=_params(opt.grad_warps, opt.grad_stages), interpret=opt.interpret,
        name="ssd_bwd_chunk",
    )(*args)
    outs = dict(zip(out_names, outs))
    sum_splits = lambda a: a.reshape(b, L, g, S, n).sum(axis=3)
    dD = outs["dD"].sum(axis=(0, 1)) if cfg.has_D else None
    return (outs["dx"], outs["ddt"], outs["dcum"], sum_splits(outs["dB"]),
            sum_splits(outs["dC"]), dD)


_core = pc.make_core(forward, backward_dstates, backward_chunks)


def ssd_pallas_gpu(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
                   dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, initial_state=None,
                   segment_ids=None, interpret=False, options: GpuOptions | None = None,
                   block_t: int | None = None):
    """SSD through the Triton kernels.  Returns ``(y, final_state)`` like every backend.

    ``chunk_size`` picks the kernel chunk (``default_block_t``); p and n are padded to powers
    of two (>= 16) when they are not (Triton tiles).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    T = block_t or default_block_t(chunk_size)
    pp, pn = max(16, pc.next_pow2(p)), max(16, pc.next_pow2(n))
    nc = -(-l // T)
    if options is None:
        options = default_options(b, h, pp, g, nc, interpret)
    elif interpret and not options.interpret:
        options = dataclasses.replace(options, interpret=True)
    return pc.run(_core, x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                  dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
                  segment_ids=segment_ids, block_t=T, pad_p=pp, pad_n=pn,
                  backend_options=options)
