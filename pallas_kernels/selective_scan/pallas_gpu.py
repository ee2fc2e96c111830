"""Selective scan as Pallas kernels for NVIDIA GPUs, through Pallas' Triton lowering.

Why Triton and not Mosaic GPU: the scan is a sequential recurrence over time whose per-step
work is elementwise on a small (n, d_block) state plus two reductions; it uses neither the
tensor cores (wgmma) nor bulk tensor copies, which are what Mosaic GPU is for.  The Triton
lowering takes plain ``jax.numpy`` on refs, lays out registers itself, and runs under
``interpret=True`` on a CPU, which is how this file is tested.  It is selected explicitly
with ``compiler_params=pltriton.CompilerParams(...)`` (jax >= 0.9 defaults to Mosaic GPU
when no compiler params are given).  JAX 0.11 deprecates the Triton lowering; porting these
two kernels to Mosaic GPU (``plgpu.kernel``) is the way forward when it is removed.  The
measurements since then point the same way: the forward is bound by load latency that the
Triton lowering gives no control over, and Mosaic GPU's TMA pipelines address exactly that.
``pallas_mgpu`` holds a Mosaic GPU forward, 2x faster on an H200 and the default there
(``GpuConfig.forward``, ``resolve_forward``), whose checkpoints feed the backward below; the
Triton forward remains for older GPUs, widths that are not multiples of 128 and single long
sequences (which it splits across programs).

Layout (channels last, like the public API):

* grid = (batch * S, d // d_block); a program (one warp) owns d_block channels of one batch
  row and keeps their (n, d_block) float32 state in registers while it walks its part of the
  sequence: all of it (S = 1), or one of S splits (``seq_splits``, see "sequence splits"
  below: a small kernel and an XLA chain first give each split its entering state);
* per step it loads one row u[t], delta[t], z[t] (d_block values) and B[t], C[t] (n values,
  read as float32: they are small), and stores one row of y.  Steps run in unrolled groups
  (``unroll``); the next group's loads are issued before this group's compute and carried
  in registers (``prefetch``, ``prefetch_bc``), and a group's stores come after all its
  loads (a store may alias a later load as far as the compiler knows).  The scan is bound
  by memory latency, not bandwidth or arithmetic: on an H100 prefetching B / C as well cut
  the Jamba-layer forward from 2.44 to 1.44 ms (BENCHMARKS.md);
* exp(delta A) is computed as exp2(delta * A2), A2 = A log2(e) scaled once in XLA: one MUFU
  op and one multiply per state element.  The exp2 and the state update's multiply-add are
  inline PTX (``_exp2``, ``_fma``; plain jax.numpy in the interpreter): the lowering would
  otherwise emit libdevice's exp2f (three more instructions for denormals) and an unfused
  multiply and add.  On an H200 that cut the Jamba-layer forward from 1.48 to 1.34 ms and its
  registers from 211 to 130 per thread.  The per-channel softplus and gate do the same
  (``_softplus``: exp2 and a polynomial log1p; ``_sigmoid``: exp2 and ``rcp.approx``) in
  place of libdevice's expf, log1pf and IEEE division: 166 -> 126 instructions per warp and
  step, forward 1.34 -> 1.12 ms, forward + backward 5.99 -> 5.14 ms (H200, Jamba layer);
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
adjoint carry left after step 0.  With ``bwd_seq_splits`` S > 1 each program takes the chunks
of one split, starting from the adjoint carry leaving it (a reverse split-state kernel and
XLA chain), and dA, dD, d(delta_bias) are summed over splits in XLA.  The defaults
(d_block 16, chunk 16, sub_chunk 4) are the largest that compile without register spills
(checked with ptxas for sm_90a; split backward kernels spill 16 bytes outside the inner
loops).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu_splits import chain_splits, compute_capability, effective_splits, num_sms

from .pallas_mgpu import LANES as MGPU_LANES
from .pallas_mgpu import SMEM_BYTES as MGPU_SMEM_BYTES
from .pallas_mgpu import smem_bytes as mgpu_smem_bytes
from .pallas_mgpu import forward_arrays as mgpu_forward
from .pallas_common import (
    ScanOptions,
    LN2,
    LOG2E,
    f32,
    gate_and_grad,
    grouped_partials_to_dBC,
    keep_from_segments,
    largest_pow2_divisor,
    make_core,
    out_struct,
    next_pow2,
    softplus_poly,
)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Block sizes of the GPU kernels (powers of two) and sequence splits.

    fwd_d_block / fwd_num_warps / unroll: forward channels per program, warps, steps per
      unrolled group.  prefetch: load the next group's per-channel rows (u, delta, z) while
      computing this one; prefetch_bc: B and C too (2 * n more registers per step).
    bwd_d_block / bwd_num_warps: same for the backward.
    chunk: steps between stored checkpoints (forward under differentiation; backward chunk).
    sub_chunk: steps whose states the backward keeps in registers at once (divides chunk).
    seq_splits / bwd_seq_splits: programs along the sequence in the forward / the backward
      (any positive int; the kernels use the largest divisor of l // chunk not above it).
      None picks them with ``default_seq_splits``.
    forward: "triton" (the kernels below), "mgpu" (the Mosaic GPU forward of ``pallas_mgpu``:
      one warpgroup per 128 channels, no sequence splits; its checkpoints every ``chunk``
      steps feed the same backward) or "auto": "mgpu" on a Hopper or newer GPU when the
      channels per group are a multiple of 128 and there are at least half as many programs
      as SMs, else "triton" (always in interpret mode; see ``resolve_forward``).
    mgpu_block_l / mgpu_stages / mgpu_poly_exp / mgpu_unroll: that forward's steps per tile
      (a multiple of chunk), input tiles in flight, states whose decay exponential runs on the
      multiply-add units, steps unrolled per loop (divides chunk).  None: 4 * chunk and
      chunk (the fastest measured, BENCHMARKS.md).  A call shortens the tile by whole chunks
      to what the sequence needs and to what fits in shared memory (``mgpu_tile``).
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
    seq_splits: int | None = None
    bwd_seq_splits: int | None = None
    forward: str = "auto"
    mgpu_block_l: int | None = None
    mgpu_stages: int = 2
    mgpu_poly_exp: int = 0
    mgpu_unroll: int | None = None

    def __post_init__(self):
        if self.forward not in ("auto", "triton", "mgpu"):
            raise ValueError(f"GpuConfig.forward must be 'auto', 'triton' or 'mgpu', "
                             f"found {self.forward!r}")
        for name in ("fwd_d_block", "fwd_num_warps", "unroll", "bwd_d_block", "bwd_num_warps",
                     "chunk", "sub_chunk"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GpuConfig.{name} must be a power of two, found {v}")
        if self.chunk % self.sub_chunk:
            raise ValueError("GpuConfig.sub_chunk must divide chunk")
        if (self.mgpu_stages < 1 or self.mgpu_poly_exp < 0 or self.chunk % self.mgpu_unroll_steps
                or self.mgpu_block_steps % self.chunk):
            raise ValueError("GpuConfig needs mgpu_stages >= 1, mgpu_poly_exp >= 0, "
                             "mgpu_unroll dividing chunk and mgpu_block_l a multiple of chunk")
        for name in ("seq_splits", "bwd_seq_splits"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"GpuConfig.{name} must be None or >= 1, found {v}")

    @property
    def mgpu_block_steps(self) -> int:
        """mgpu_block_l, or its default of 4 * chunk."""
        return self.mgpu_block_l or 4 * self.chunk

    @property
    def mgpu_unroll_steps(self) -> int:
        """mgpu_unroll, or its default of chunk."""
        return self.mgpu_unroll or self.chunk


DEFAULT_CONFIG = GpuConfig()


def resolve_forward(cfg: GpuConfig, b: int, d: int, g: int, interpret: bool) -> GpuConfig:
    """The config with ``forward="auto"`` replaced by the kernel that runs (see GpuConfig).

    The Mosaic GPU forward has one program per 128 channels and no sequence splits, so with
    fewer programs than half the SMs (one long sequence) the Triton forward, which splits the
    sequence, is used (H200, b = 1, l = 16384, d = 4096: 2.0 ms with 4 splits against 2.7 ms,
    measured before the Mosaic GPU forward's group stores; BENCHMARKS.md)."""
    if cfg.forward != "auto":
        return cfg
    cc = None if interpret else compute_capability()
    use_mgpu = (cc is not None and cc[0] in (9, 10) and (d // g) % MGPU_LANES == 0
                and 2 * b * (d // MGPU_LANES) >= num_sms())
    return dataclasses.replace(cfg, forward="mgpu" if use_mgpu else "triton")


def mgpu_tile(cfg: GpuConfig, l: int, n: int, tile_itemsizes, y_itemsize: int, *,
              has_keep: bool, consts_rows: int) -> tuple[int, int] | None:
    """(steps per tile, padded states) of the Mosaic GPU forward for one call: the longest
    tile of whole chunks, up to ``mgpu_block_l`` and to l rounded up to a chunk, whose shared
    memory (with checkpoints) fits; None when not even one chunk fits."""
    top = min(cfg.mgpu_block_steps, pl.cdiv(l, cfg.chunk) * cfg.chunk)
    for K in range(top, 0, -cfg.chunk):
        n_pad = max(next_pow2(n), 32 // K)   # a (K, n) float32 tile of B is >= 128 bytes (TMA)
        need = mgpu_smem_bytes(K, n_pad, tile_itemsizes, y_itemsize, has_keep=has_keep,
                               consts_rows=consts_rows + n_pad, ckpt_every=cfg.chunk,
                               stages=cfg.mgpu_stages)
        if need <= MGPU_SMEM_BYTES:
            return K, n_pad
    return None

# --------------------------------------------------------------------------- sequence splits
# A program walks the whole sequence, so the grid has only b * d / d_block one-warp programs
# (Jamba-v0.1: 1024, mamba-130m: 768, on an H100's 132 SMs) and the walk's latency sets the
# time.  With S splits, each program walks l / S steps: a first kernel computes, for every
# split but the last, the state its steps produce from a zero start (no y) and the sum of its
# delta; an XLA chain over the splits turns those into the state entering every split (the
# state crossing split s is multiplied by exp(A * sum of delta over s), or by 0 where a
# segment starts inside s); the usual forward then runs all splits in parallel.  The backward
# does the same for its adjoint carry, walking backwards (splits 1 .. S-1, reverse chain).
# Splits are whole checkpoint chunks (S divides l // chunk); the last split also takes the
# l % chunk tail steps.
#
# Heuristic (``default_seq_splits``): double S while the doubled grid has at most
# MAX_WARPS_PER_SM = 8 warps per SM (two per warp scheduler) and >= 8 chunks per split.  The
# split-state pass costs about (S - 1) / S of a forward walk without y, so splitting pays
# only where the grid leaves schedulers short of warps.  Measured on one H200 (forward,
# BENCHMARKS.md): Jamba-v0.1, 1024 warps -> S = 2: 1.34 -> 1.82 ms; mamba-130m, 768 warps ->
# S = 2: 0.68 -> 0.72 ms; so both stay unsplit, in both directions, while e.g. b = 1 (512
# warps for Jamba) splits in two.  Register use never limits this: a one-warp program has
# at most 255 registers per thread, and 8 such warps fit an SM's 65536 registers.
MAX_WARPS_PER_SM = 8
MIN_CHUNKS_PER_SPLIT = 8


def _auto_splits(warps: int, chunks: int, max_warps: int) -> int:
    S = 1
    while (warps * 2 * S <= max_warps and chunks % (2 * S) == 0
           and chunks // (2 * S) >= MIN_CHUNKS_PER_SPLIT):
        S *= 2
    return S


def default_seq_splits(b: int, l: int, d: int, g: int = 1, config: GpuConfig | None = None):
    """(forward, backward) sequence splits used for a call (the config's, or the heuristic
    above when None), after rounding to a divisor of l // chunk."""
    cfg = resolve_forward(config or DEFAULT_CONFIG, b, d, g, interpret=False)
    chunks = l // cfg.chunk
    max_warps = MAX_WARPS_PER_SM * num_sms()
    out = []
    for req, block, warps in (
            (1 if cfg.forward == "mgpu" else cfg.seq_splits, cfg.fwd_d_block, cfg.fwd_num_warps),
            (cfg.bwd_seq_splits, cfg.bwd_d_block, cfg.bwd_num_warps)):
        if req is None:
            grid = b * (d // largest_pow2_divisor(d // g, block)) * warps
            req = _auto_splits(grid, chunks, max_warps)
        out.append(effective_splits(req, chunks))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Static(ScanOptions):
    """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""
    b: int
    l: int
    d: int
    n: int          # padded to a power of two
    g: int
    fwd_block: int
    bwd_block: int
    fwd_splits: int
    bwd_splits: int
    cfg: GpuConfig
    interpret: bool

    @property
    def chunks(self) -> int:
        """Full checkpoint chunks; the l % chunk tail steps belong to the last split."""
        return self.l // self.cfg.chunk

    def split_len(self, S: int) -> int:
        """Steps of a split, the last split's tail excluded."""
        return self.chunks // S * self.cfg.chunk


def _params(num_warps):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


# --------------------------------------------------------------------------- block specs
def _grid(b: int, nblk: int, splits: int):
    """(b * splits, d // d_block): program (i, j) owns channel block j of batch row
    i // splits and split i % splits.  Splits share the batch axis rather than adding a third
    one: at 255 registers the backward is on the edge, and ptxas spilled inside its hot loops
    with a 3-D grid (S = 4, 8) but not with this one (S = 1 compiles exactly as before)."""
    return (b * splits, nblk)


def _split_id(splits: int):
    """The program's index along the sequence (0 with one split)."""
    return lax.rem(pl.program_id(0), splits) if splits > 1 else 0


def _specs(st: _Static, db: int, splits: int):
    """BlockSpecs for a ``_grid`` of ``splits`` splits; B / C read the group of the program's
    channels.  Per-position arrays are passed whole along l: a program indexes its split's
    rows itself (the last split's tail makes splits unequal)."""
    l, n = st.l, st.n
    blocks_per_group = (st.d // st.g) // db
    S = splits
    row = (lambda i: i) if S == 1 else (lambda i: lax.div(i, S))
    sid = (lambda i: 0) if S == 1 else (lambda i: lax.rem(i, S))
    return dict(
        bld=pl.BlockSpec((None, l, db), lambda i, j: (row(i), 0, j)),
        nd=pl.BlockSpec((n, db), lambda i, j: (0, j)),
        blgn=pl.BlockSpec((None, l, None, n),
                          lambda i, j: (row(i), 0, lax.div(j, blocks_per_group), 0)),
        d=pl.BlockSpec((db,), lambda i, j: (j,)),
        bnd=pl.BlockSpec((None, n, db), lambda i, j: (row(i), 0, j)),
        bl=pl.BlockSpec((None, l), lambda i, j: (row(i), 0)),
        bsnd=pl.BlockSpec((None, None, n, db), lambda i, j: (row(i), sid(i), 0, j)),  # per split
        bsd=pl.BlockSpec((None, None, db), lambda i, j: (row(i), sid(i), j)),
        ckpt=pl.BlockSpec((None, pl.cdiv(l, st.cfg.chunk), n, db),
                          lambda i, j: (row(i), 0, 0, j)),
        part=pl.BlockSpec((None, None, l, n), lambda i, j: (row(i), j, 0, 0)),
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


def _ptx(instruction: str, fallback, interpret: bool, *args):
    """One float32 PTX instruction per element (``$0`` the result, ``$1``.. the args) on the
    GPU; ``fallback`` (the same math in jax.numpy) in the interpreter.  Why: without it the
    Triton lowering emits ``a * b + c`` as a separate multiply and add, and ``jnp.exp2`` as
    libdevice's exp2f, whose denormal handling costs three instructions around the MUFU op."""
    if interpret:
        return fallback(*args)
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
    args = [jnp.broadcast_to(jnp.asarray(a, f32), shape) for a in args]
    constraints = ",".join(["=f"] + ["f"] * len(args))
    [out] = pltriton.elementwise_inline_asm(
        instruction, args=args, constraints=constraints, pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, f32)])
    return out


def _fma(a, b, c, interpret: bool):
    """a * b + c, rounded once."""
    return _ptx("fma.rn.f32 $0, $1, $2, $3;", lambda a, b, c: a * b + c, interpret, a, b, c)


def _exp2(x, interpret: bool):
    """2^x by the MUFU alone (denormal results flush to 0)."""
    return _ptx("ex2.approx.ftz.f32 $0, $1;", jnp.exp2, interpret, x)


def _rcp(x, interpret: bool):
    """1 / x by the MUFU alone (within 1 ulp; the lowering's IEEE division costs ~10
    instructions and a branch)."""
    return _ptx("rcp.approx.ftz.f32 $0, $1;", lambda x: 1.0 / x, interpret, x)


def _sigmoid(x, interpret: bool):
    """1 / (1 + e^-x): two MUFU ops and an add (e^-x overflowing to inf gives 0)."""
    return _rcp(1.0 + _exp2(x * -LOG2E, interpret), interpret)


def _softplus(x, interpret: bool):
    """``softplus_poly`` with the MUFU exp2 and PTX FMAs: one MUFU op and ten FMAs, several
    times fewer instructions than the lowering's libdevice expf and log1pf.  MUFU's own lg2
    is no substitute: its absolute error (2^-22) is a large relative error of log1p(e) for the
    small e that typical delta biases give (e ~ 1e-3)."""
    return softplus_poly(x, functools.partial(_exp2, interpret=interpret),
                         functools.partial(_fma, interpret=interpret))


def _walk(t0, count, carry, load, body, unroll, prefetch, reverse=False):
    """``count`` (static) steps from t0 in unrolled groups of ``unroll``: ``body(ts, k, vals,
    carry)`` runs the k steps ts .. ts+k-1 (``vals``: their loads, ``load(t)`` each).  With
    ``prefetch`` the next group's loads are issued before this group's compute and carried in
    registers; the last group prefetches itself again rather than a group past the range, so
    every load stays in bounds with no per-step clamp (a clamp per step costs its address
    arithmetic on every load).  ``reverse``: groups from the end (the body walks its steps
    backwards too), the count % unroll remainder, at t0, last."""
    U = unroll
    groups, rem = divmod(count, U)
    if reverse:
        first, rem_t = (lambda i: t0 + count - (i + 1) * U), t0
    else:
        first, rem_t = (lambda i: t0 + i * U), t0 + groups * U
    loads = lambda ts, k: [load(ts + j) for j in range(k)]
    if groups and prefetch:
        def group(i, c):
            carry, cur = c
            nxt = loads(first(jnp.minimum(i + 1, groups - 1)), U)
            return body(first(i), U, cur, carry), nxt
        carry, _ = lax.fori_loop(0, groups, group, (carry, loads(first(0), U)))
    elif groups:
        carry = lax.fori_loop(0, groups, lambda i, c: body(first(i), U, loads(first(i), U), c),
                              carry)
    if rem:
        carry = body(rem_t, rem, loads(rem_t, rem), carry)
    return carry


def _when_last(s, S, f, carry):
    """f(carry) in the last split (s == S - 1), else carry.  s is a Python int when the grid
    has a single split (the Triton lowering takes no cond on a constant)."""
    if isinstance(s, int):
        return f(carry) if s == S - 1 else carry
    return lax.cond(s == S - 1, f, lambda c: c, carry)


def _delta(pre, bias, st: _Static):
    """float32 delta of a step from the stored row: softplus(delta + bias), each optional."""
    pre = pre.astype(f32)
    if bias is not None:
        pre = pre + bias
    return pre, (_softplus(pre, st.interpret) if st.softplus else pre)


# --------------------------------------------------------------------------- forward
def _fwd_has_init(st: _Static) -> bool:
    return st.has_h0 or st.fwd_splits > 1


def _fwd_kernel(st: _Static, save: bool, local: bool, *refs):
    """The forward over the program's split from the state entering it; or, with ``local``,
    the zero-start state of split s (< S-1) and the sum of its delta, without y."""
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref = (next(it) for _ in range(4))
    C_ref = _take(it, not local)
    D_ref = _take(it, st.has_D and not local)
    z_ref = _take(it, st.has_z and not local)
    bias_ref = _take(it, st.has_bias)
    h0_ref = _take(it, _fwd_has_init(st) and not local)
    keep_ref = _take(it, st.has_keep)
    if local:
        loc_ref, dls_ref = next(it), next(it)
    else:
        y_ref, final_ref = next(it), next(it)
        ck_ref = _take(it, save)

    n, db, K1, S = st.n, st.fwd_block, st.cfg.chunk, st.fwd_splits
    Ls, cps = st.split_len(S), st.chunks // S
    s = _split_id(S - 1 if local else S)
    A2 = _load_rows(A_ref, n, db)                     # A log2(e), scaled once in XLA
    Dv = D_ref[...].astype(f32) if D_ref is not None else None
    bias = bias_ref[...].astype(f32) if st.has_bias else None
    pf_bc = st.cfg.prefetch_bc

    def load_bc(t):
        return B_ref[t, :], (None if local else C_ref[t, :])

    def load(t):
        """Step t's per-channel inputs, as stored; with prefetch_bc also B[t], C[t]."""
        return (u_ref[t, :], dt_ref[t, :], z_ref[t, :] if z_ref is not None else None,
                keep_ref[t] if st.has_keep else None, load_bc(t) if pf_bc else None)

    def advance(v, Bt, h):
        """h_t from h_{t-1}: one exp2 per state element (A pre-scaled by log2 e)."""
        u, pre, _, keep, _ = v
        u = u.astype(f32)
        _, dl = _delta(pre, bias, st)
        a = _exp2(dl[None, :] * A2, st.interpret)              # exp(dl A), (n, db)
        if keep is not None:
            a = a * keep
        return _fma(a, h, Bt[:, None] * (dl * u)[None, :], st.interpret), u, dl

    def body(t0, count, vals, carry):
        """``count`` steps from t0 with their per-channel inputs ``vals``: B / C loads
        first, then the recurrence, then the stores (a store may alias any later load, so
        none sits between the group's loads)."""
        bc = [vals[k][4] if pf_bc else load_bc(t0 + k) for k in range(count)]
        if local:
            h, dls = carry
            for k in range(count):
                h, _, dl = advance(vals[k], bc[k][0], h)
                dls = dls + dl
            return h, dls
        h, ys = carry, []
        for k in range(count):
            h, u, _ = advance(vals[k], bc[k][0], h)
            y = jnp.sum(h * bc[k][1][:, None], axis=0)
            if Dv is not None:
                y = y + Dv * u
            zt = vals[k][2]
            if zt is not None:
                zt = zt.astype(f32)
                y = y * (zt * _sigmoid(zt, st.interpret))
            ys.append(y.astype(y_ref.dtype))
        for k in range(count):
            y_ref[t0 + k, :] = ys[k]
        return h

    walk = functools.partial(_walk, load=load, body=body, unroll=st.cfg.unroll,
                             prefetch=st.cfg.prefetch)
    zeros = jnp.zeros((n, db), f32)
    if local:
        h, dls = walk(s * Ls, Ls, (zeros, jnp.zeros((db,), f32)))
        loc_ref[...] = h
        dls_ref[...] = dls
        return

    h = _load_rows(h0_ref, n, db) if h0_ref is not None else zeros
    tail = st.l - st.chunks * K1
    if not save and S == 1:
        final_ref[...] = walk(0, st.l, h)
        return
    if save:
        def chunk(c, h):
            c = s * cps + c
            ck_ref[c, :, :] = h
            return walk(c * K1, K1, h)
        if cps:
            h = lax.fori_loop(0, cps, chunk, h)
    elif Ls:
        h = walk(s * Ls, Ls, h)

    def finish(h):
        if tail:
            if save:
                ck_ref[st.chunks, :, :] = h
            h = walk(st.chunks * K1, tail, h)
        final_ref[...] = h

    if S == 1:
        finish(h)
    else:
        pl.when(s == S - 1)(lambda: finish(h))


def _split_alive(keep, st: _Static, S: int):
    """(b, S) float32: 0 where a segment starts inside split s (the carried state is reset),
    else 1; the last split includes the tail.  None without segments."""
    if keep is None:
        return None
    Ls = st.split_len(S)
    alive = keep[:, :S * Ls].reshape(st.b, S, Ls).min(axis=-1)
    if S * Ls < st.l:
        alive = alive.at[:, -1].min(keep[:, S * Ls:].min(axis=-1))
    return alive


def _split_carry(dls, A2, alive, reverse):
    """(b, S-1, n, d): what each split (0 .. S-2 forward, 1 .. S-1 reverse) does to the state
    crossing it: exp(A * sum of its delta), or 0 when a segment starts inside it.  dls (b, S-1, d)."""
    carry = jnp.exp2(A2[None, None] * dls[:, :, None, :])
    if alive is not None:
        carry = carry * (alive[:, 1:] if reverse else alive[:, :-1])[:, :, None, None]
    return carry


def _entering_states(st: _Static, arrays):
    """(b, S, n, d) float32: the state entering every forward split."""
    u, delta, A2, B, C, D, z, bias, h0, keep = arrays
    b, d, n, db, S = st.b, st.d, st.n, st.fwd_block, st.fwd_splits
    s = _specs(st, db, S - 1)
    present = [(u, s["bld"]), (delta, s["bld"]), (A2, s["nd"]), (B, s["blgn"]),
               (bias, s["d"]), (keep, s["bl"])]
    present = [(x, spec) for x, spec in present if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in present])
    local, dls = pl.pallas_call(
        functools.partial(_fwd_kernel, st, False, True),
        out_shape=[_sds((b, S - 1, n, d), f32), _sds((b, S - 1, d), f32)],
        grid=_grid(b, d // db, S - 1),
        in_specs=[spec for _, spec in present],
        out_specs=[s["bsnd"], s["bsd"]],
        compiler_params=_params(st.cfg.fwd_num_warps),
        interpret=st.interpret,
        name="selective_scan_fwd_split_state",
    )(*(x for x, _ in present))
    first = h0 if h0 is not None else jnp.zeros((b, n, d), f32)
    carry = _split_carry(dls, A2, _split_alive(keep, st, S), reverse=False)
    return chain_splits(local, carry, first, reverse=False)


def _forward(st: _Static, arrays, save: bool):
    u, delta, A2, B, C, D, z, bias, h0, keep = arrays
    b, l, d, n, db, S = st.b, st.l, st.d, st.n, st.fwd_block, st.fwd_splits
    if st.cfg.forward == "mgpu":
        return mgpu_forward(u, delta, A2, B, C, D, z, bias, h0, keep, softplus=st.softplus,
                            block_l=st.cfg.mgpu_block_steps, ckpt_every=st.cfg.chunk if save else None,
                            stages=st.cfg.mgpu_stages,
                            poly_exp=st.cfg.mgpu_poly_exp, unroll=st.cfg.mgpu_unroll_steps,
                            interpret=st.interpret)
    init = _entering_states(st, arrays) if S > 1 else (h0[:, None] if h0 is not None else None)
    s = _specs(st, db, S)
    present = [(u, s["bld"]), (delta, s["bld"]), (A2, s["nd"]), (B, s["blgn"]), (C, s["blgn"]),
               (D, s["d"]), (z, s["bld"]), (bias, s["d"]), (init, s["bsnd"]), (keep, s["bl"])]
    present = [(x, spec) for x, spec in present if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in present])
    out_shape = [_sds((b, l, d), u.dtype), _sds((b, n, d), f32)]
    out_specs = [s["bld"], s["bnd"]]
    if save:
        out_shape.append(_sds((b, pl.cdiv(l, st.cfg.chunk), n, d), f32))
        out_specs.append(s["ckpt"])
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, st, save, False),
        out_shape=out_shape,
        grid=_grid(b, d // db, S),
        in_specs=[spec for _, spec in present],
        out_specs=out_specs,
        compiler_params=_params(st.cfg.fwd_num_warps),
        interpret=st.interpret,
        name="selective_scan_fwd",
    )(*(x for x, _ in present))
    return outs[0], outs[1], (outs[2] if save else None)


# --------------------------------------------------------------------------- backward
def _bwd_split_kernel(st: _Static, *refs):
    """Zero-start adjoint carry of backward split s + 1 (program split s): the gradient its
    steps send to the state before its first step, walking backwards from its end with
    nothing arriving from later splits; and the sum of its delta."""
    it = iter(refs)
    dt_ref, A_ref, C_ref, dout_ref = (next(it) for _ in range(4))
    z_ref, bias_ref, keep_ref = (_take(it, f) for f in (st.has_z, st.has_bias, st.has_keep))
    loc_ref, dls_ref = next(it), next(it)

    n, db, K1, S = st.n, st.bwd_block, st.cfg.chunk, st.bwd_splits
    Ls = st.split_len(S)
    s = _split_id(S - 1) + 1
    A2 = _load_rows(A_ref, n, db)
    bias = bias_ref[...].astype(f32) if st.has_bias else None

    def load(t):
        return (dt_ref[t, :], C_ref[t, :], dout_ref[t, :],
                z_ref[t, :] if st.has_z else None, keep_ref[t] if st.has_keep else None)

    def body(t0, count, vals, carry):
        g, dls = carry
        for k in reversed(range(count)):
            pre, Ct, dout, zt, keep = vals[k]
            _, dl = _delta(pre, bias, st)
            a = _exp2(dl[None, :] * A2, st.interpret)
            if keep is not None:
                a = a * keep
            dy = dout.astype(f32)
            if zt is not None:
                zt = zt.astype(f32)
                dy = dy * (zt * _sigmoid(zt, st.interpret))
            g = a * (g + Ct.astype(f32)[:, None] * dy[None, :])
            dls = dls + dl
        return g, dls

    walk = functools.partial(_walk, load=load, body=body, unroll=st.cfg.unroll,
                             prefetch=st.cfg.prefetch, reverse=True)
    carry = (jnp.zeros((n, db), f32), jnp.zeros((db,), f32))
    tail = st.l - st.chunks * K1
    if tail:   # the last split's tail steps come first, walking backwards
        carry = _when_last(s, S, lambda c: walk(st.chunks * K1, tail, c), carry)
    g, dls = walk(s * Ls, Ls, carry)
    loc_ref[...] = g
    dls_ref[...] = dls


def _leaving_grads(st: _Static, arrays, dy, dfinal):
    """(b, S, n, d) float32: the adjoint carry (gradient of the state) leaving every backward
    split, i.e. what reaches its last state from later steps and the final-state cotangent."""
    u, delta, A2, B, C, D, z, bias, h0, keep = arrays
    b, d, n, db, S = st.b, st.d, st.n, st.bwd_block, st.bwd_splits
    s = _specs(st, db, S - 1)
    present = [(delta, s["bld"]), (A2, s["nd"]), (C, s["blgn"]), (dy, s["bld"]), (z, s["bld"]),
               (bias, s["d"]), (keep, s["bl"])]
    present = [(x, spec) for x, spec in present if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in present])
    local, dls = pl.pallas_call(
        functools.partial(_bwd_split_kernel, st),
        out_shape=[_sds((b, S - 1, n, d), f32), _sds((b, S - 1, d), f32)],
        grid=_grid(b, d // db, S - 1),
        in_specs=[spec for _, spec in present],
        out_specs=[s["bsnd"], s["bsd"]],
        compiler_params=_params(st.cfg.bwd_num_warps),
        interpret=st.interpret,
        name="selective_scan_bwd_split_dstate",
    )(*(x for x, _ in present))
    carry = _split_carry(dls, A2, _split_alive(keep, st, S), reverse=True)
    return chain_splits(local, carry, dfinal, reverse=True)


def _bwd_kernel(st: _Static, *refs):
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref = (next(it) for _ in range(5))
    D_ref, z_ref, bias_ref, keep_ref = (
        _take(it, f) for f in (st.has_D, st.has_z, st.has_bias, st.has_keep))
    ck_ref, dout_ref, dleave_ref = next(it), next(it), next(it)
    du_ref, ddt_ref = next(it), next(it)
    dz_ref = _take(it, st.has_z)
    dB_ref, dC_ref, dA_ref = next(it), next(it), next(it)
    dD_ref, dbias_ref, dh0_ref = (_take(it, f) for f in (st.has_D, st.has_bias, st.has_h0))

    n, db, S = st.n, st.bwd_block, st.bwd_splits
    K1, K2 = st.cfg.chunk, st.cfg.sub_chunk
    M = K1 // K2
    cps = st.chunks // S
    s = _split_id(S)
    A2 = _load_rows(A_ref, n, db)                     # A log2(e)
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
        pre, dl = _delta(pre, bias, st)
        x = dl * u
        Bt = Bt.astype(f32)
        a = _exp2(dl[None, :] * A2, st.interpret)
        if keep is not None:
            a = a * keep
        return _fma(a, h, Bt[:, None] * x[None, :], st.interpret), (u, pre, dl, x, Bt, a)

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
            gate, gate_grad = gate_and_grad(
                zt.astype(f32), functools.partial(_sigmoid, interpret=st.interpret))
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
        dA = _fma(q, dl[None, :], dA, st.interpret)          # times ln 2 in XLA: d/d(A2)
        ddl = sB * u + LN2 * jnp.sum(q * A2, axis=0)          # d(log a)/d(dl) = A = ln2 A2
        du = dl * sB
        if st.has_D:
            du = du + Dv * dy
            dD = dD + dy * u
        du_ref[t, :] = du.astype(du_ref.dtype)
        if st.softplus:
            ddl = ddl * _sigmoid(pre, st.interpret)
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
            h, sv = recompute(vals[k], h)
            hs.append(h)
            saved.append(sv)
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
    carry = (_load_rows(dleave_ref, n, db), jnp.zeros((n, db), f32), zeros_d, zeros_d)
    full = st.chunks
    r = st.l - full * K1
    if r:   # the tail chunk (last split only)
        tail = lambda carry: chunk_backward(full * K1, full, r // K2, r % K2, carry)
        carry = _when_last(s, S, tail, carry)
    if cps:
        last = cps - 1 if S == 1 else (s + 1) * cps - 1     # the split's last chunk

        def chunk(i, carry):
            c = last - i
            return chunk_backward(c * K1, c, M, 0, carry)
        carry = lax.fori_loop(0, cps, chunk, carry)
    g, dA, dD, dbias = carry
    dA_ref[...] = dA
    if st.has_D:
        dD_ref[...] = dD
    if st.has_bias:
        dbias_ref[...] = dbias
    if st.has_h0:
        if S == 1:
            dh0_ref[...] = g
        else:
            @pl.when(s == 0)
            def _():
                dh0_ref[...] = g


def _backward(st: _Static, arrays, ckpt, dy, dfinal):
    u, delta, A2, B, C, D, z, bias, h0, keep = arrays
    b, l, d, n, db, S = st.b, st.l, st.d, st.n, st.bwd_block, st.bwd_splits
    nblk = d // db
    dleave = _leaving_grads(st, arrays, dy, dfinal) if S > 1 else dfinal[:, None]
    s = _specs(st, db, S)
    ins = [(u, s["bld"]), (delta, s["bld"]), (A2, s["nd"]), (B, s["blgn"]), (C, s["blgn"]),
           (D, s["d"]), (z, s["bld"]), (bias, s["d"]), (keep, s["bl"]),
           (ckpt, s["ckpt"]), (dy, s["bld"]), (dleave, s["bsnd"])]
    ins = [(x, spec) for x, spec in ins if x is not None]
    _sds = functools.partial(out_struct, inputs=[x for x, _ in ins])
    outs = [(_sds(u.shape, u.dtype), s["bld"]),
            (_sds(delta.shape, delta.dtype), s["bld"])]
    if st.has_z:
        outs.append((_sds(z.shape, z.dtype), s["bld"]))
    outs += [(_sds((b, nblk, l, n), f32), s["part"])] * 2
    outs.append((_sds((b, S, n, d), f32), s["bsnd"]))
    if st.has_D:
        outs.append((_sds((b, S, d), f32), s["bsd"]))
    if st.has_bias:
        outs.append((_sds((b, S, d), f32), s["bsd"]))
    if st.has_h0:
        outs.append((_sds((b, n, d), f32), s["bnd"]))
    res = iter(pl.pallas_call(
        functools.partial(_bwd_kernel, st),
        out_shape=[o for o, _ in outs],
        grid=_grid(b, nblk, S),
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
    dA2 = (next(res).sum((0, 1)) * LN2).astype(A2.dtype)
    dD = next(res).sum((0, 1)).astype(D.dtype) if st.has_D else None
    dbias = next(res).sum((0, 1)).astype(bias.dtype) if st.has_bias else None
    dh0 = next(res).astype(h0.dtype) if st.has_h0 else None
    return du, ddelta, dA2, dB, dC, dD, dz, dbias, dh0, None


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
    b, l, d = u.shape
    n = A.shape[-1]
    Bg = B if B.ndim == 4 else B[:, :, None, :]
    Cg = C if C.ndim == 4 else C[:, :, None, :]
    g = Bg.shape[2]
    cfg = resolve_forward(config or DEFAULT_CONFIG, b, d, g, interpret)
    n_pad = next_pow2(n)   # Triton tensors have power-of-two sizes; padded states stay 0
    if cfg.forward == "mgpu":
        fit = mgpu_tile(cfg, l, n, [x.dtype.itemsize for x in (u, delta, z) if x is not None],
                        u.dtype.itemsize, has_keep=segment_ids is not None,
                        consts_rows=(D is not None) + (delta_bias is not None))
        if fit is None and (config or DEFAULT_CONFIG).forward == "mgpu":
            raise ValueError("selective_scan: the Mosaic GPU forward does not fit in shared "
                             "memory for these dtypes / n; use GpuConfig(forward='triton')")
        if fit is None:
            cfg = dataclasses.replace(cfg, forward="triton")
        else:
            K, n_pad = fit
            cfg = dataclasses.replace(cfg, mgpu_block_l=K)
    pad_n = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)])
    # A log2(e): the kernels take exp(delta A) as exp2(delta * A2), one MUFU op per element
    # and no other multiply; autodiff of this scaling turns d/dA2 into dA.
    A2_nd = pad_n(A.astype(f32) * LOG2E).T                             # (n, d)
    h0 = None if initial_state is None else jnp.swapaxes(pad_n(initial_state.astype(f32)), 1, 2)
    fwd_splits, bwd_splits = default_seq_splits(b, l, d, g, cfg)
    st = _Static(
        b=b, l=l, d=d, n=n_pad, g=g, softplus=bool(delta_softplus),
        has_D=D is not None, has_z=z is not None, has_bias=delta_bias is not None,
        has_h0=h0 is not None, has_keep=segment_ids is not None,
        fwd_block=largest_pow2_divisor(d // g, cfg.fwd_d_block),
        bwd_block=largest_pow2_divisor(d // g, cfg.bwd_d_block),
        fwd_splits=fwd_splits, bwd_splits=bwd_splits,
        cfg=cfg, interpret=bool(interpret),
    )
    # B / C are small (b * l * g * n): reading them as float32 spares the kernel unpacking
    # 2 * n bf16 values per step and thread.
    y, final = _core(
        st, u, delta, A2_nd, pad_n(Bg.astype(f32)), pad_n(Cg.astype(f32)),
        None if D is None else D.astype(f32), z,
        None if delta_bias is None else delta_bias.astype(f32),
        h0, keep_from_segments(segment_ids, b, l),
    )
    return y, jnp.swapaxes(final, 1, 2)[:, :, :n]
