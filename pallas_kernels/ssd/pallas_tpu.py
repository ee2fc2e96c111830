"""Pallas SSD kernels for TPUs (Mosaic).

Same plan, same chunk math (:mod:`pallas_kernels.ssd.pallas_common`) as the Triton backend,
written the TPU way: the chunk loop is the last grid axis (``"arbitrary"``, executed in order on
one core) and the carried state lives in a VMEM scratch buffer, initialised at the first chunk;
blocks come in through BlockSpecs (pipelined DMA), so a kernel body sees one chunk:

* ``_fwd_kernel``, grid (b, h, chunks): state (p, n) float32 in scratch; final state written
  at the last chunk.
* ``_dstate_kernel``, grid (b, h, chunks) with chunk index maps reversed.
* ``_chunk_grad_kernel``, grid (b, chunks, g, heads of the group): the head axis is the
  innermost ``"arbitrary"`` axis; C.B^T is computed at the group's first head and the summed
  dB/dC/score gradient stay in scratch, written out at its last head.

Mosaic wants the last two dims of a block to be (8k, 128m) or the array's own, so the wrapper
moves heads in front (x (b, h, l, p), B/C (b, g, l, n)) and passes per-position vectors both as
columns (.., T, 1) and rows (.., 1, T); on hardware T should be a multiple of 128 (the default).
``interpret=True`` runs the kernels in Pallas' TPU interpreter (``pltpu.InterpretParams``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import pallas_common as pc
from pallas_kernels.ssd.reference import DEFAULT_DT_LIMIT

f32 = jnp.float32


def _group(head, heads_per_group: int):
    """The B / C group of a head block index.  lax.div (truncating; indices are >= 0) in the
    index's own dtype: ``//`` lowers through sign, which Mosaic lowers only for a known TPU, and
    a Python int divisor becomes int64 under jax_enable_x64."""
    return lax.div(head, jnp.asarray(heads_per_group, head.dtype))


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    interpret: bool = False
    vmem_limit_bytes: int | None = None


def default_block_t(chunk_size: int, interpret: bool = False) -> int:
    """The kernel's chunk T: 128 or 256 (MXU tiles, lane-dense (1, T) rows; Mosaic needs a
    multiple of 128 there).  Only in the interpreter, where no tiling applies, does a smaller
    chunk_size (rounded up to a multiple of 8) give a smaller T, so that CPU tests cover
    several chunks on short sequences."""
    if chunk_size >= 256:
        return 256
    if chunk_size >= 128 or not interpret:
        return 128
    return -(-chunk_size // 8) * 8


def _compiler_params(opt: TpuOptions, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=opt.vmem_limit_bytes)


def _interpret(opt: TpuOptions):
    return pltpu.InterpretParams() if opt.interpret else False


def _unpack(refs, names):
    return dict(zip(names, refs))


class _HeadMajor:
    """Views of the prepared (channels-last) arrays in the TPU kernels' layout."""

    def __init__(self, P: pc.Prepared, T: int):
        b, L, h, p = P.x.shape
        self.nc = L // T
        hm = lambda a: None if a is None else jnp.swapaxes(a, 1, 2)     # (b, l, h, .) -> (b, h, l, .)
        self.x, self.z = hm(P.x), hm(P.z)
        self.B, self.C = hm(P.B), hm(P.C)
        self.dt_col, self.dt_row = P.dt[..., None], P.dt[:, :, None, :]
        self.cum_col, self.cum_row = P.cum[..., None], P.cum[:, :, None, :]
        self.sid_col = None if P.sid is None else P.sid[:, :, None]
        self.sid_row = None if P.sid is None else P.sid[:, None, :]
        self.sid_prev = P.sid_prev
        self.D = None if P.D is None else P.D[:, None, :]              # (h, 1, p)
        self.init = P.init


class _Args:
    def __init__(self):
        self.names, self.arrays, self.specs = [], [], []

    def add(self, name, array, spec):
        self.names.append(name), self.arrays.append(array), self.specs.append(spec)


def _segments(r, c_idx, b_idx):
    return pc.segment_masks(r["sid_col"][...], r["sid_row"][...], r["sid_prev"][b_idx, c_idx])


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: pc.Config, names, nc: int, save: bool):
    r = _unpack(refs, names)
    bi, c = pl.program_id(0), pl.program_id(2)
    prec = cfg.precision

    @pl.when(c == 0)
    def _():
        if cfg.has_init:
            r["state"][...] = r["init"][...].astype(f32)
        else:
            r["state"][...] = jnp.zeros(r["state"].shape, f32)

    state = r["state"][...]
    if save:
        r["states"][...] = state.astype(r["states"].dtype)
    seg = _segments(r, c, bi) if cfg.has_segments else None
    x = r["x"][...]
    y, state = pc.chunk_forward(x, r["B"][...], r["C"][...], r["dt_col"][...], r["dt_row"][...],
                                r["cum_col"][...], r["cum_row"][...], state, seg, prec)
    if cfg.has_D:
        y = y + r["D"][...] * x.astype(f32)
    if cfg.has_z:
        if save:
            r["y_pre"][...] = y.astype(r["y_pre"].dtype)
        zf = r["z"][...].astype(f32)
        y = y * zf * pc.sigmoid(zf)
    r["y"][...] = y.astype(r["y"].dtype)
    r["state"][...] = state

    @pl.when(c == nc - 1)
    def _():
        r["final"][...] = state


def forward(cfg: pc.Config, P: pc.Prepared, save: bool):
    opt: TpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    g, n = P.B.shape[2:]
    T, R = cfg.block_t, cfg.heads_per_group
    V = _HeadMajor(P, T)
    nc = V.nc
    a = _Args()
    x_spec = pl.BlockSpec((None, None, T, p), lambda i, j, c: (i, j, c, 0))
    a.add("x", V.x, x_spec)
    bc_spec = pl.BlockSpec((None, None, T, n), lambda i, j, c: (i, _group(j, R), c, 0))
    a.add("B", V.B, bc_spec)
    a.add("C", V.C, bc_spec)
    col_spec = pl.BlockSpec((None, None, T, 1), lambda i, j, c: (i, j, c, 0))
    row_spec = pl.BlockSpec((None, None, 1, T), lambda i, j, c: (i, j, 0, c))
    a.add("dt_col", V.dt_col, col_spec)
    a.add("dt_row", V.dt_row, row_spec)
    a.add("cum_col", V.cum_col, col_spec)
    a.add("cum_row", V.cum_row, row_spec)
    if cfg.has_segments:
        a.add("sid_col", V.sid_col, pl.BlockSpec((None, T, 1), lambda i, j, c: (i, c, 0)))
        a.add("sid_row", V.sid_row, pl.BlockSpec((None, 1, T), lambda i, j, c: (i, 0, c)))
        a.add("sid_prev", V.sid_prev, pl.BlockSpec(memory_space=pltpu.SMEM))
    st_spec = pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))
    if cfg.has_init:
        a.add("init", V.init, st_spec)
    if cfg.has_D:
        a.add("D", V.D, pl.BlockSpec((None, 1, p), lambda i, j, c: (j, 0, 0)))
    if cfg.has_z:
        a.add("z", V.z, x_spec)

    struct = functools.partial(pc.out_struct, inputs=a.arrays)
    out_names = ["y", "final"]
    out_shapes = [struct((b, h, L, p), cfg.op_dtype),
                  struct((b, h, p, n), f32)]
    out_specs = [x_spec, st_spec]
    if save:
        out_names.append("states")
        out_shapes.append(struct((b, h, nc, p, n), cfg.state_dtype))
        out_specs.append(pl.BlockSpec((None, None, None, p, n), lambda i, j, c: (i, j, c, 0, 0)))
        if cfg.has_z:
            out_names.append("y_pre")
            out_shapes.append(struct((b, h, L, p), cfg.op_dtype))
            out_specs.append(x_spec)

    kernel = functools.partial(_fwd_kernel, cfg=cfg, names=tuple(a.names + out_names + ["state"]),
                               nc=nc, save=save)
    outs = pl.pallas_call(
        kernel, grid=(b, h, nc), in_specs=a.specs, out_specs=out_specs, out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM((p, n), f32)],
        compiler_params=_compiler_params(opt, ("parallel", "parallel", "arbitrary")),
        interpret=_interpret(opt), name="ssd_fwd",
    )(*a.arrays)
    outs = dict(zip(out_names, outs))
    cl = lambda v: None if v is None else jnp.swapaxes(v, 1, 2)
    # States stay head-major (b, h, nc, p, n): only backward_chunks reads them.
    return cl(outs["y"]), outs["final"], outs.get("states"), cl(outs.get("y_pre"))


# --------------------------------------------------------------------------- backward: state sweep
def _dstate_kernel(*refs, cfg: pc.Config, names, nc: int):
    r = _unpack(refs, names)
    bi, i = pl.program_id(0), pl.program_id(2)
    c = nc - 1 - i

    @pl.when(i == 0)
    def _():
        r["dstate"][...] = r["dfinal"][...].astype(f32)

    dstate = r["dstate"][...]
    r["dstates"][...] = dstate.astype(r["dstates"].dtype)
    seg = _segments(r, c, bi) if cfg.has_segments else None
    dstate = pc.dstate_step(dstate, r["dy"][...], r["C"][...], r["cum_col"][...],
                            r["cum_row"][...], seg, cfg.precision)
    r["dstate"][...] = dstate

    @pl.when(i == nc - 1)
    def _():
        r["dinit"][...] = dstate


def backward_dstates(cfg: pc.Config, P: pc.Prepared, dy, dfinal):
    opt: TpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    g, n = P.B.shape[2:]
    T, R = cfg.block_t, cfg.heads_per_group
    V = _HeadMajor(P, T)
    nc = V.nc
    rev = lambda c: nc - 1 - c
    a = _Args()
    a.add("dy", jnp.swapaxes(dy, 1, 2), pl.BlockSpec((None, None, T, p),
                                                      lambda i, j, c: (i, j, rev(c), 0)))
    a.add("C", V.C, pl.BlockSpec((None, None, T, n), lambda i, j, c: (i, _group(j, R), rev(c), 0)))
    a.add("cum_col", V.cum_col, pl.BlockSpec((None, None, T, 1), lambda i, j, c: (i, j, rev(c), 0)))
    a.add("cum_row", V.cum_row, pl.BlockSpec((None, None, 1, T), lambda i, j, c: (i, j, 0, rev(c))))
    if cfg.has_segments:
        a.add("sid_col", V.sid_col, pl.BlockSpec((None, T, 1), lambda i, j, c: (i, rev(c), 0)))
        a.add("sid_row", V.sid_row, pl.BlockSpec((None, 1, T), lambda i, j, c: (i, 0, rev(c))))
        a.add("sid_prev", V.sid_prev, pl.BlockSpec(memory_space=pltpu.SMEM))
    st_spec = pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))
    a.add("dfinal", dfinal, st_spec)
    out_names = ["dstates", "dinit"]
    struct = functools.partial(pc.out_struct, inputs=a.arrays)
    kernel = functools.partial(_dstate_kernel, cfg=cfg,
                               names=tuple(a.names + out_names + ["dstate"]), nc=nc)
    dstates, dinit = pl.pallas_call(
        kernel, grid=(b, h, nc), in_specs=a.specs,
        out_specs=[pl.BlockSpec((None, None, None, p, n), lambda i, j, c: (i, j, rev(c), 0, 0)),
                   st_spec],
        out_shape=[struct((b, h, nc, p, n), cfg.state_dtype),
                   struct((b, h, p, n), f32)],
        scratch_shapes=[pltpu.VMEM((p, n), f32)],
        compiler_params=_compiler_params(opt, ("parallel", "parallel", "arbitrary")),
        interpret=_interpret(opt), name="ssd_bwd_dstate",
    )(*a.arrays)
    return dstates, dinit                                         # (b, h, nc, p, n)


# --------------------------------------------------------------------------- backward: chunk grads
def _chunk_grad_kernel(*refs, cfg: pc.Config, names, heads: int):
    r = _unpack(refs, names)
    bi, c, ri = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    prec = cfg.precision
    B = r["B"][...]
    C = r["C"][...]

    @pl.when(ri == 0)
    def _():
        r["CB"][...] = pc.mm(C, B, "nt", prec)
        r["W_acc"][...] = jnp.zeros(r["W_acc"].shape, f32)
        r["dB_acc"][...] = jnp.zeros(r["dB_acc"].shape, f32)
        r["dC_acc"][...] = jnp.zeros(r["dC_acc"].shape, f32)

    seg = _segments(r, c, bi) if cfg.has_segments else None
    x = r["x"][...]
    dy = r["dy"][...]
    hg = pc.chunk_backward_head(x, dy, B, C, r["CB"][...], r["dt_col"][...], r["dt_row"][...],
                                r["cum_col"][...], r["cum_row"][...], r["states"][...],
                                r["dstates"][...], seg, prec)
    dx = hg.dx
    if cfg.has_D:
        dx = dx + r["D"][...] * dy.astype(f32)
        r["dD"][...] = jnp.sum(dy.astype(f32) * x.astype(f32), axis=0, keepdims=True)
    r["dx"][...] = dx.astype(r["dx"].dtype)
    r["ddt"][...] = hg.ddt
    r["dcum_col"][...] = hg.dcum_col
    r["dcum_row"][...] = hg.dcum_row
    r["W_acc"][...] += hg.W
    r["dB_acc"][...] += hg.dB
    r["dC_acc"][...] += hg.dC

    @pl.when(ri == heads - 1)
    def _():
        dB_intra, dC_intra = pc.group_grads_from_scores(r["W_acc"][...], B, C, prec)
        r["dB"][...] = r["dB_acc"][...] + dB_intra
        r["dC"][...] = r["dC_acc"][...] + dC_intra


def backward_chunks(cfg: pc.Config, P: pc.Prepared, dy, states, dstates):
    opt: TpuOptions = cfg.backend_options
    b, L, h, p = P.x.shape
    g, n = P.B.shape[2:]
    T, R = cfg.block_t, cfg.heads_per_group
    V = _HeadMajor(P, T)
    nc = V.nc
    head = lambda k, ri: k * R + ri
    a = _Args()
    x_spec = pl.BlockSpec((None, None, T, p), lambda i, c, k, ri: (i, head(k, ri), c, 0))
    a.add("x", V.x, x_spec)
    a.add("dy", jnp.swapaxes(dy, 1, 2), x_spec)
    bc_spec = pl.BlockSpec((None, None, T, n), lambda i, c, k, ri: (i, k, c, 0))
    a.add("B", V.B, bc_spec)
    a.add("C", V.C, bc_spec)
    col_spec = pl.BlockSpec((None, None, T, 1), lambda i, c, k, ri: (i, head(k, ri), c, 0))
    row_spec = pl.BlockSpec((None, None, 1, T), lambda i, c, k, ri: (i, head(k, ri), 0, c))
    a.add("dt_col", V.dt_col, col_spec)
    a.add("dt_row", V.dt_row, row_spec)
    a.add("cum_col", V.cum_col, col_spec)
    a.add("cum_row", V.cum_row, row_spec)
    st_spec = pl.BlockSpec((None, None, None, p, n), lambda i, c, k, ri: (i, head(k, ri), c, 0, 0))
    a.add("states", states, st_spec)
    a.add("dstates", dstates, st_spec)
    if cfg.has_segments:
        a.add("sid_col", V.sid_col, pl.BlockSpec((None, T, 1), lambda i, c, k, ri: (i, c, 0)))
        a.add("sid_row", V.sid_row, pl.BlockSpec((None, 1, T), lambda i, c, k, ri: (i, 0, c)))
        a.add("sid_prev", V.sid_prev, pl.BlockSpec(memory_space=pltpu.SMEM))
    if cfg.has_D:
        a.add("D", V.D, pl.BlockSpec((None, 1, p), lambda i, c, k, ri: (head(k, ri), 0, 0)))

    struct = functools.partial(pc.out_struct, inputs=a.arrays)
    out_names = ["dx", "ddt", "dcum_col", "dcum_row", "dB", "dC"]
    out_shapes = [struct((b, h, L, p), cfg.op_dtype),
                  struct((b, h, L, 1), f32),
                  struct((b, h, L, 1), f32),
                  struct((b, h, 1, L), f32),
                  struct((b, g, L, n), f32),
                  struct((b, g, L, n), f32)]
    out_specs = [x_spec, col_spec, col_spec, row_spec, bc_spec, bc_spec]
    if cfg.has_D:
        out_names.append("dD")
        out_shapes.append(struct((b, nc, h, 1, p), f32))
        out_specs.append(pl.BlockSpec((None, None, None, 1, p),
                                      lambda i, c, k, ri: (i, c, head(k, ri), 0, 0)))
    kernel = functools.partial(
        _chunk_grad_kernel, cfg=cfg, heads=R,
        names=tuple(a.names + out_names + ["CB", "W_acc", "dB_acc", "dC_acc"]))
    outs = pl.pallas_call(
        kernel, grid=(b, nc, g, R), in_specs=a.specs, out_specs=out_specs, out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM((T, T), f32), pltpu.VMEM((T, T), f32),
                        pltpu.VMEM((T, n), f32), pltpu.VMEM((T, n), f32)],
        compiler_params=_compiler_params(opt, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(opt), name="ssd_bwd_chunk",
    )(*a.arrays)
    o = dict(zip(out_names, outs))
    dcum = o["dcum_col"][..., 0] + o["dcum_row"][:, :, 0, :]
    dD = o["dD"].sum(axis=(0, 1))[:, 0, :] if cfg.has_D else None
    return (jnp.swapaxes(o["dx"], 1, 2), o["ddt"][..., 0], dcum, jnp.swapaxes(o["dB"], 1, 2),
            jnp.swapaxes(o["dC"], 1, 2), dD)


_core = pc.make_core(forward, backward_dstates, backward_chunks)


def ssd_pallas_tpu(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
                   dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, initial_state=None,
                   segment_ids=None, interpret=False, options: TpuOptions | None = None,
                   block_t: int | None = None):
    """SSD through the Mosaic TPU kernels.  Returns ``(y, final_state)`` like every backend."""
    T = block_t or default_block_t(chunk_size, interpret)
    options = options or TpuOptions()
    if interpret and not options.interpret:
        options = dataclasses.replace(options, interpret=True)
    return pc.run(_core, x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                  dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
                  segment_ids=segment_ids, block_t=T, backend_options=options)
