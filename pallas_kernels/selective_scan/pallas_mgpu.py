"""Selective-scan forward as a Pallas Mosaic GPU kernel (Hopper): the GPU default forward.

On one H100 it takes 0.47 ms at a Jamba-v0.1 layer and 0.25 ms at a mamba-130m layer, against
1.05 / 0.52 ms for the Triton forward (BENCHMARKS.md, selective scan, session 12).

Why: the Triton-lowered forward (``pallas_gpu``) is bound by load latency. ptxas places the
prefetch loads late, and with b * d / 16 one-warp programs there are only ~2 warps per
scheduler to hide that latency (BENCHMARKS.md, selective scan, session 6).  Here
``plgpu.emit_pipeline`` streams (K, 128) tiles of u / delta / z and (K, n) tiles of B / C into
shared memory with TMA, ``max_concurrent_steps`` tiles ahead, so the recurrence reads shared
memory only.

Layout: ``plgpu.kernel`` over (b, d / 128); a program is one warpgroup (128 threads) holding
128 channels, one per thread, and all n states of its channel in registers (n separate
(128,) arrays, the pipeline's carry).  So the per-channel work (softplus, gate, D) is done once
per channel and y's sum over the states is a chain of multiply-adds with no shuffles; B[t, i]
and C[t, i] are scalar shared-memory reads (``LDS.128`` broadcasts to every thread).  y tiles (and with
checkpoints, the state entering every E steps (E dividing K): (b, l / E, n, d), the Triton
backward's when E is its chunk) go back through double-buffered shared memory and TMA
stores.

The arithmetic avoids the slow paths of the special-function unit (MUFU, 16 results per
clock and SM, one 2^x per state and step): a segment reset is folded into the decay's
exponent, the gate's sigmoid is rsqrt(1 + e^-z)^2 rather than an IEEE division, and
``poly_exp`` of the n decays can move to the multiply-add units (``pallas_common.exp2_poly``,
128 per clock); measured, that has only been slower so far.  Pallas' automatic barriers are
off (see ``forward_arrays``) and each group of steps stores its y rows last (see
``_recurrence``): each of the two had serialised the steps.  What binds now (BENCHMARKS.md,
sessions 11-12, ablations and ncu): instruction issue with one warp per scheduler, eligible in
56% of cycles, a step taking 222 cycles against the 152 of its 19 MUFU instructions; not HBM
and not the B / C broadcasts.

Tested on the CPU in JAX's Mosaic GPU interpreter and by lowering for CUDA (which runs the
Mosaic GPU layout passes); ``benchmarks/selective_scan.py`` checks it on the GPU.
``plgpu.kernel`` rather than ``pl.pallas_call``: JAX 0.11 lowers Mosaic GPU only through the
former.  Float32 state throughout.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .pallas_common import LOG2E, ScanOptions, exp2_poly, f32, keep_from_segments, softplus_poly

try:
    InterpretGPUParams = plgpu.InterpretGPUParams                  # jax >= 0.11
except AttributeError:                                              # jax 0.10: not public yet
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

LANES = 128            # channels per program: one warpgroup, one channel per thread
SMEM_BYTES = 232448    # shared memory one block may use on sm_90 / sm_100 (227 KiB)
_SMEM_SLACK = 1024     # barriers and alignment


def smem_bytes(block_l: int, n: int, tile_itemsizes, y_itemsize: int, *, has_keep: bool,
               consts_rows: int, ckpt_every: int | None, stages: int) -> int:
    """Shared memory of one program: ``stages`` sets of input tiles ((block_l, 128) for each
    itemsize in tile_itemsizes: u, delta and z; (block_l, n) float32 B and C; the segment
    column), the constants and state rows, and double-buffered y and checkpoint tiles."""
    K = block_l
    per_stage = sum(K * LANES * i for i in tile_itemsizes) + 2 * K * n * 4 + has_keep * K * 32 * 4
    ck = 2 * (K // ckpt_every) * n * LANES * 4 if ckpt_every else 0
    return (stages * per_stage + (consts_rows + n) * LANES * 4 + 2 * K * LANES * y_itemsize + ck
            + _SMEM_SLACK)


def _recurrence(cfg, A2, Dv, bias, s, u_ref, dt_ref, B_ref, C_ref, z_ref, keep_ref, y_ref, h,
                start, stop):
    """Steps start .. stop - 1 of tile s from shared memory: h (n arrays of (128,)) -> h
    after them.

    Steps run in groups of ``unroll``: a group first loads its u, delta, z rows, then computes,
    and stores its y rows last.  A shared-memory load after a store cannot be moved above it
    (ptxas cannot tell that they never alias), so storing y every step would chain each
    step's loads to the previous step's whole computation.

    The decay of state i is 2^(delta A_i log2(e) + k_t), k_t = log2 of the keep factor (0, or
    -inf where a segment starts), so a reset costs no multiply.  The first ``poly_exp``
    states take their 2^x on the multiply-add units (``exp2_poly``), the rest on the
    special-function unit (16 results per clock and SM).  y's sum over the states runs in
    two interleaved chains to halve its latency."""
    l, n, K, G = cfg.l, cfg.n, cfg.K, cfg.unroll
    tail = l % K                      # steps of the last tile past l are padding

    def delta(t, raw):
        dl = raw.astype(f32)
        if bias is not None:
            dl = dl + bias
        if cfg.softplus:
            dl = softplus_poly(dl)
        if tail:                      # padding steps leave the state as it is
            dl = jnp.where(s * K + t < l, dl, 0.0)
        return dl

    def group(k, h):
        t0 = start + k * G
        ts = [t0 + j for j in range(G)]
        us = [u_ref[t, :] for t in ts]
        dts = [dt_ref[t, :] for t in ts]
        zs = [z_ref[t, :] for t in ts] if z_ref is not None else None
        ys = []
        for j, t in enumerate(ts):
            u = us[j].astype(f32)
            dl = delta(t, dts[j])
            x = dl * u
            log2_keep = keep_ref[t, 0] if keep_ref is not None else None
            acc = [None, None]
            out = []
            for i in range(n):
                arg = dl * A2[i] if log2_keep is None else dl * A2[i] + log2_keep
                a = exp2_poly(arg) if i < cfg.poly_exp else jnp.exp2(arg)
                hi = a * h[i] + B_ref[t, i] * x
                c = C_ref[t, i] * hi
                acc[i % 2] = c if acc[i % 2] is None else acc[i % 2] + c
                out.append(hi)
            h = tuple(out)
            y = acc[0] if acc[1] is None else acc[0] + acc[1]
            if Dv is not None:
                y = y + Dv * u
            if zs is not None:
                zt = zs[j].astype(f32)
                r = lax.rsqrt(1.0 + jnp.exp2(zt * -LOG2E))    # sigmoid = r^2: no IEEE division
                y = y * (zt * (r * r))
            ys.append(y.astype(y_ref.dtype))
        for t, y in zip(ts, ys):
            y_ref[t, :] = y
        return h

    return lax.fori_loop(0, (stop - start) // G, group, h)


@dataclasses.dataclass(frozen=True)
class _Cfg(ScanOptions):
    l: int
    n: int
    K: int
    ckpt_every: int | None     # steps between saved states (divides K); None: none saved
    blocks_per_group: int
    stages: int
    poly_exp: int
    unroll: int


def _selective_scan_fwd_kernel(cfg: _Cfg, *refs):
    """One program: batch row i, channels j*128 .. j*128+127, the whole sequence."""
    n, K = cfg.n, cfg.K
    it = iter(refs)
    u_g, dt_g, A_g, B_g, C_g = (next(it) for _ in range(5))
    D_g = next(it) if cfg.has_D else None
    z_g = next(it) if cfg.has_z else None
    bias_g = next(it) if cfg.has_bias else None
    h0_g = next(it) if cfg.has_h0 else None
    keep_g = next(it) if cfg.has_keep else None
    y_g, final_g = next(it), next(it)
    ck_g = next(it) if cfg.ckpt_every else None
    consts, state, y_buf = next(it), next(it), next(it)
    ck_buf = next(it) if cfg.ckpt_every else None
    barrier = next(it)

    i, j = lax.axis_index("b"), lax.axis_index("c")
    cols = pl.ds(j * LANES, LANES)
    # per-program constants once into shared memory: A log2(e) rows, then D and bias
    plgpu.copy_gmem_to_smem(A_g.at[:, cols], consts.at[pl.ds(0, n)], barrier)
    plgpu.barrier_wait(barrier)
    extra_rows = {}                  # "D" / "bias" -> its row of consts
    for name, ref in (("D", D_g), ("bias", bias_g)):
        if ref is not None:
            extra_rows[name] = row = n + len(extra_rows)
            plgpu.copy_gmem_to_smem(ref.at[cols], consts.at[row], barrier)
            plgpu.barrier_wait(barrier)
    # the entering state goes through shared memory either way: a constant zero would have a
    # splat layout, and the pipeline's carry must keep the loaded one (one element per thread)
    if cfg.has_h0:
        plgpu.copy_gmem_to_smem(h0_g.at[i, :, cols], state, barrier)
        plgpu.barrier_wait(barrier)
    else:
        for k in range(n):
            state[k, :] = jnp.zeros((LANES,), f32)
    h = tuple(state[k, :] for k in range(n))
    A2 = [consts[k, :] for k in range(n)]
    Dv, bias = (consts[extra_rows[name], :] if name in extra_rows else None for name in ("D", "bias"))

    g = j // cfg.blocks_per_group
    tile = lambda: pl.BlockSpec((None, K, LANES), lambda s: (i, s, j))
    in_specs = [tile(), tile(),
                pl.BlockSpec((None, K, None, n), lambda s: (i, s, g, 0)),
                pl.BlockSpec((None, K, None, n), lambda s: (i, s, g, 0))]
    ins = [u_g, dt_g, B_g, C_g]
    if cfg.has_z:
        in_specs.append(tile())
        ins.append(z_g)
    if cfg.has_keep:
        in_specs.append(pl.BlockSpec((None, K, 32), lambda s: (i, s, 0)))
        ins.append(keep_g)
    # outputs are written back by hand, double-buffered: the pipeline's own output copies are
    # predicated, which this JAX's Mosaic GPU interpreter cannot run
    def body(idx, *refs_and_carry):
        (s,) = idx
        *refs, h = refs_and_carry
        it = iter(refs)
        u_r, dt_r, B_r, C_r = (next(it) for _ in range(4))
        z_r = next(it) if cfg.has_z else None
        keep_r = next(it) if cfg.has_keep else None
        slot = lax.rem(s, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)    # slot's copy of step s - 2 is done
        E = cfg.ckpt_every or K
        for c in range(K // E):
            if cfg.ckpt_every:
                for k in range(n):
                    ck_buf[slot, c, k, :] = h[k]
            h = _recurrence(cfg, A2, Dv, bias, s, u_r, dt_r, B_r, C_r, z_r, keep_r,
                            y_buf.at[slot], h, c * E, (c + 1) * E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_buf.at[slot], y_g.at[i, pl.ds(s * K, K), cols],
                                commit_group=not cfg.ckpt_every)
        if cfg.ckpt_every:
            plgpu.copy_smem_to_gmem(ck_buf.at[slot], ck_g.at[i, pl.ds(s * (K // E), K // E), :, cols])
        return h

    steps = u_g.shape[1] // K
    h = plgpu.emit_pipeline(body, grid=(steps,), in_specs=in_specs,
                            max_concurrent_steps=cfg.stages, init_carry=h)(*ins)
    for k in range(n):
        state[k, :] = h[k]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state, final_g.at[i, :, cols])
    plgpu.wait_smem_to_gmem(0)


def forward_arrays(u, delta, A2, B, C, D, z, bias, h0, keep, *, softplus: bool, block_l: int,
                   ckpt_every: int | None, stages: int = 2, poly_exp: int = 0, unroll: int = 1,
                   interpret: bool = False):
    """The kernel on arrays already in the GPU backends' layout: A2 = A log2(e) as (n, d);
    B, C float32 (b, l, g, n); h0 float32 (b, n, d); keep float32 (b, l) (0 where a segment
    starts) or None.  Returns y (b, l, d), the final state (b, n, d) and, with ``ckpt_every``
    (dividing block_l), the state entering every ``ckpt_every`` steps
    (b, ceil(l / ckpt_every), n, d); else None.

    block_l: steps per pipelined tile; stages: tiles in flight in the input pipeline;
    poly_exp: states (of n) whose decay exponential runs on the multiply-add units; unroll:
    steps unrolled in the tile loop (divides ckpt_every, or block_l without it)."""
    b, l, d = u.shape
    n, g = A2.shape[0], B.shape[2]
    if (d // g) % LANES:
        raise ValueError(f"channels per group ({d // g}) must be a multiple of {LANES}")
    K = block_l
    if (K * n * 4) % 128:
        raise ValueError(f"a (block_l, n) float32 tile of B must be a multiple of 128 bytes "
                         f"(TMA): block_l={K}, n={n}")
    steps = pl.cdiv(l, K)
    L = steps * K
    pad_l = lambda x: jnp.pad(x, [(0, 0), (0, L - l)] + [(0, 0)] * (x.ndim - 2))
    E = ckpt_every or K
    if not 0 <= poly_exp <= n or K % E or E % unroll:
        raise ValueError(f"need 0 <= poly_exp <= n, ckpt_every dividing block_l and unroll "
                         f"dividing both: poly_exp={poly_exp}, n={n}, ckpt_every={ckpt_every}, "
                         f"block_l={block_l}, unroll={unroll}")
    if keep is not None:   # as log2(keep); a copy moves a multiple of 128 bytes: (b, l, 32)
        log2_keep = jnp.where(keep > 0, 0.0, -jnp.inf).astype(f32)
        keep = jnp.broadcast_to(jnp.pad(log2_keep, [(0, 0), (0, L - l)])[:, :, None], (b, L, 32))
    ins = [pad_l(u), pad_l(delta), A2, pad_l(B), pad_l(C), D,
           None if z is None else pad_l(z), bias, h0, keep]
    cfg = _Cfg(l=l, n=n, K=K, softplus=bool(softplus), has_D=D is not None,
               has_z=z is not None, has_bias=bias is not None, has_h0=h0 is not None,
               has_keep=keep is not None, ckpt_every=ckpt_every, blocks_per_group=(d // g) // LANES,
               stages=stages, poly_exp=poly_exp, unroll=unroll)
    out_type = [jax.ShapeDtypeStruct((b, L, d), u.dtype), jax.ShapeDtypeStruct((b, n, d), f32)]
    if ckpt_every:
        out_type.append(jax.ShapeDtypeStruct((b, L // E, n, d), f32))
    consts_rows = n + cfg.has_D + cfg.has_bias
    smem = smem_bytes(K, n, [x.dtype.itemsize for x in (u, delta, z) if x is not None],
                      u.dtype.itemsize, has_keep=keep is not None, consts_rows=consts_rows,
                      ckpt_every=ckpt_every, stages=stages)
    if smem > SMEM_BYTES:
        raise ValueError(f"the Mosaic GPU forward needs {smem} bytes of shared memory, more than "
                         f"{SMEM_BYTES}: use a shorter block_l (now {K}) or fewer stages")
    outs = plgpu.kernel(
        functools.partial(_selective_scan_fwd_kernel, cfg),
        out_type=out_type,
        scratch_types=[plgpu.SMEM((consts_rows, LANES), f32), plgpu.SMEM((n, LANES), f32),
                       plgpu.SMEM((2, K, LANES), u.dtype),
                       *([plgpu.SMEM((2, K // E, n, LANES), f32)] if ckpt_every else []),
                       plgpu.Barrier()],
        grid=(b, d // LANES),
        grid_names=("b", "c"),
        # Lane semantics (per-thread register layouts, as this kernel is written): the
        # default until JAX 0.10, Warpgroup from 0.11
        # No automatic barriers: Pallas would put a warpgroup barrier before and after every
        # shared-memory store (y and checkpoint rows, each step), which serialises the steps.
        # Each thread only writes its own column; the cross-thread hand-overs (TMA in and
        # out) are ordered by the barrier waits, wait_smem_to_gmem and commit_smem above.
        # The body's commit_smem also ends every read of its input slot before the pipeline
        # refills that slot by TMA (no automatic barrier precedes the refill).
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                                             lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=InterpretGPUParams() if interpret else None,
    )(*(x for x in ins if x is not None))
    return outs[0][:, :l], outs[1], (outs[2][:, :pl.cdiv(l, E)] if ckpt_every else None)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "block_l", "ckpt_every",
                                             "interpret", "max_concurrent_steps", "poly_exp",
                                             "unroll"))
def selective_scan_fwd_mgpu(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                            delta_softplus=False, initial_state=None, segment_ids=None,
                            block_l=16, ckpt_every=None, interpret=False, max_concurrent_steps=2,
                            poly_exp=0, unroll=1):
    """The forward of ``selective_scan`` (channels last): u, delta, z (b, l, d); A (d, n);
    B, C (b, l, n) or (b, l, g, n); initial_state (b, d, n).  Returns y (b, l, d) in u's dtype
    and the final state (b, d, n) float32, plus with ``ckpt_every`` the state entering every
    ``ckpt_every`` steps, (b, ceil(l / ckpt_every), n, d) float32.  ``interpret``: run on the
    CPU in the Mosaic GPU interpreter.  max_concurrent_steps, poly_exp, unroll: as stages,
    poly_exp, unroll of ``forward_arrays``."""
    b, l, d = u.shape
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    y, final, ck = forward_arrays(
        u, delta, (A.astype(f32) * LOG2E).T, B.astype(f32), C.astype(f32),
        None if D is None else D.astype(f32), z,
        None if delta_bias is None else delta_bias.astype(f32),
        None if initial_state is None else jnp.swapaxes(initial_state.astype(f32), 1, 2),
        keep_from_segments(segment_ids, b, l), softplus=delta_softplus, block_l=block_l,
        ckpt_every=ckpt_every, stages=max_concurrent_steps, poly_exp=poly_exp, unroll=unroll,
        interpret=interpret)
    final = jnp.swapaxes(final, 1, 2)
    return (y, final, ck) if ckpt_every else (y, final)
