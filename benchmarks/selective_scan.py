"""Benchmark of the Mamba-1 selective scan on one GPU: the Pallas kernel against our XLA paths.

    python benchmarks/selective_scan.py                  # on a GPU: check, then time
    python benchmarks/selective_scan.py --tiny           # CPU smoke test (interpret mode)
    python benchmarks/selective_scan.py --skip-check --skip-baselines --no-variants \
        --sweep jamba-v0.1:2:16:2,jamba-v0.1:1:16:4:2  # GpuConfig variants (see --sweep)

Shapes: one Jamba-v0.1 Mamba layer (b=2, l=4096, d=8192, n=16) and one mamba-130m layer
(b=8, l=2048, d=1536, n=16); bf16 u / delta / B / C / z, float32 A / D / delta_bias,
delta_softplus with a bias, like a Mamba block.  Timed: ``impl="pallas_gpu"`` (a few block
configurations), ``impl="xla"`` (chunked associative scan) and ``impl="reference"`` (one
lax.scan step per token), forward alone and forward + backward (the gradient of every
input).  Each time is the median over ``--reps`` repetitions after a warm-up, each
repetition averaging ``--inner`` back-to-back calls (default: as many as fill 0.2 s).

The memory floor is the time to move each operand once at ``--bandwidth`` bytes/s:
forward reads u, delta, B, C, z and writes y; forward + backward also reads dy and writes
du, d(delta), dB, dC, dz (A, D and the bias are negligible).  The forward also gets a
special-function floor: its n decays e^(delta A) per channel and step, one result each on
the SFU (16 per clock and SM on sm_80 / sm_90: ``--sfu-per-clock``), over every SM at
``--clock-ghz`` (default: the GPU's maximum SM clock).  A forward whose decays run on the SFU
cannot beat it, whatever its memory traffic.

Before timing, the kernels are checked on the GPU against the sequential reference in float32
(values and all gradients, segments, initial state, l not a multiple of the chunk): the Triton
forward, unsplit and with the sequence split across programs (forward 4, backward 3 splits),
and the Mosaic GPU forward with the Triton backward (d = 256); with ``--mgpu`` also the Mosaic
GPU forward alone; and at the benchmark shapes against ``impl="xla"`` when the baselines run.

``--sweep`` times GpuConfig variants after the main rows, each as SHAPE:SEQ_SPLITS:D_BLOCK
[:UNROLL[:BWD_SEQ_SPLITS]] (SHAPE: a name or an index into the shape list; the other fields
of the config are the first forward / backward variant's): the forward alone, and with a
fifth field forward + backward as well.  ``--shapes none`` skips the main rows.

A log and a JSON of all numbers go to $OUT when it is set; the short table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.cross_lowering import cuda_target  # noqa: E402
from pallas_kernels.gpu_splits import num_sms  # noqa: E402
from pallas_kernels.selective_scan import selective_scan_reference, selective_scan_xla  # noqa: E402
from pallas_kernels.selective_scan.pallas_mgpu import selective_scan_fwd_mgpu  # noqa: E402
from pallas_kernels.selective_scan.pallas_gpu import (  # noqa: E402
    GpuConfig,
    default_seq_splits,
    mgpu_tile,
    selective_scan_pallas_gpu,
)

SHAPES = {"jamba-v0.1": (2, 4096, 8192, 16), "mamba-130m": (8, 2048, 1536, 16)}
# timed only when named in --shapes: one long sequence (few channel blocks per SM)
EXTRA_SHAPES = {"one-long-seq": (1, 16384, 4096, 16)}
TINY_SHAPES = {"tiny": (2, 70, 128, 16)}
# forward variants: (fwd_d_block, fwd_num_warps, unroll, prefetch); backward: (bwd_d_block,
# bwd_num_warps, chunk, sub_chunk).  The first of each is GpuConfig's default.  Variants are
# timed at the first shape only; later shapes use the fastest.
# (a fifth entry is prefetch_bc, False when absent)
FWD_VARIANTS = [(16, 1, 4, 1, 1), (16, 1, 4, 1, 0), (8, 1, 4, 1, 1), (32, 1, 4, 1, 0)]
BWD_VARIANTS = [(16, 1, 16, 4), (8, 1, 16, 4)]

LOG = []


def log(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    LOG.append(line)


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(key_seed, b, l, d, n, dtype):
    """Mamba-like random inputs (never zeros): dt in [1e-3, 1e-1] through softplus(bias)."""
    rng = np.random.default_rng(key_seed)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d))
    x = dict(
        u=rng.standard_normal((b, l, d)),
        delta=0.5 * rng.standard_normal((b, l, d)),
        A=-np.tile(np.arange(1, n + 1, dtype=np.float64), (d, 1)) * np.exp(0.1 * rng.standard_normal((d, n))),
        B=rng.standard_normal((b, l, n)),
        C=rng.standard_normal((b, l, n)),
        D=rng.standard_normal(d),
        z=rng.standard_normal((b, l, d)),
        delta_bias=np.log(np.expm1(dt)),
    )
    f32_names = ("A", "D", "delta_bias")
    return {k: jnp.asarray(v, jnp.float32 if k in f32_names else dtype) for k, v in x.items()}


def fwd_fn(impl):
    def f(x):
        y, s = impl(**x, delta_softplus=True)
        return y, s
    return jax.jit(f)


def fwd_bwd_fn(impl):
    def f(x, dy):
        (y, s), vjp = jax.vjp(lambda a: impl(**a, delta_softplus=True), x)
        return y, vjp((dy, jnp.zeros_like(s)))[0]
    return jax.jit(f)


def timeit(fn, args, reps, inner=None, rep_seconds=0.2):
    """Median seconds per call over ``reps`` repetitions, each ``inner`` back-to-back calls
    ended by one ``block_until_ready``.  ``inner=None``: as many calls as fill ``rep_seconds``
    (at most 1000), so each repetition's dispatch and synchronisation are spread over enough
    calls not to count: at 3 calls per repetition they had added ~0.09 ms to a 0.46 ms kernel
    (BENCHMARKS.md, selective scan, session 12)."""
    out = jax.block_until_ready(fn(*args))            # warm-up (compiles)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if inner is None:
        inner = max(1, min(1000, math.ceil(rep_seconds / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            r = fn(*args)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), out


def floor_seconds(b, l, d, n, bytes_per, bandwidth, backward):
    """Each operand moved once: forward reads u, delta, z, B, C and writes y; forward +
    backward also reads dy and writes du, d(delta), dz, dB, dC."""
    bld, bln = b * l * d * bytes_per, b * l * n * bytes_per
    total = 4 * bld + 2 * bln
    if backward:
        total += 4 * bld + 2 * bln
    return total / bandwidth


def sfu_floor_seconds(b, l, d, n, sms, clock_hz, per_clock):
    """The forward's b * l * d * n decays, one special-function result each, on every SM."""
    return b * l * d * n / (sms * per_clock * clock_hz)


def max_sm_clock_hz(default_ghz=1.98):
    """The first GPU's maximum SM clock from nvidia-smi (H100 / H200 SXM: 1.98 GHz)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0]) * 1e6
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return default_ghz * 1e9


def gpu_cfg(fv, bv):
    return GpuConfig(forward="triton",
                     fwd_d_block=fv[0], fwd_num_warps=fv[1], unroll=fv[2], prefetch=bool(fv[3]),
                     prefetch_bc=bool(fv[4]) if len(fv) > 4 else False,
                     bwd_d_block=bv[0], bwd_num_warps=bv[1], chunk=bv[2], sub_chunk=bv[3])


SPLIT_CHECK = dict(seq_splits=4, bwd_seq_splits=3)    # l = 203: 12 chunks of 16 + 11


def check_small(interpret, config=None, d=64):
    """float32 on the device vs the sequential reference: values and every gradient."""
    b, l, n = 2, 203, 16                 # 203 = 12 chunks of 16 + 11 (tail: 2 sub-chunks + 3)
    x = make_inputs(1, b, l, d, n, jnp.float32)
    x["initial_state"] = jnp.asarray(np.random.default_rng(2).standard_normal((b, d, n)), jnp.float32)
    seg = np.zeros((b, l), np.int32)
    seg[:, 50:] += 1
    seg[:, 128:] += 1
    seg = jnp.asarray(seg)
    dy = jnp.asarray(np.random.default_rng(3).standard_normal((b, l, d)), jnp.float32)
    ds = jnp.asarray(np.random.default_rng(4).standard_normal((b, d, n)), jnp.float32)

    def run(impl):
        def f(x):
            (y, s), vjp = jax.vjp(lambda a: impl(**a, delta_softplus=True, segment_ids=seg), x)
            return y, s, vjp((dy, ds))[0]
        return jax.jit(f)(x)

    ours = functools.partial(selective_scan_pallas_gpu, interpret=interpret, config=config)
    y, s, g = run(ours)
    y0, s0, g0 = run(selective_scan_reference)
    errs = {"y": rel(y, y0), "final_state": rel(s, s0), **{"d" + k: rel(g[k], g0[k]) for k in x}}
    return errs


def check_mgpu_small(interpret, block_l=16, poly_exp=0, unroll=1):
    """The Mosaic GPU forward in float32 vs the sequential reference.  A tile too long for
    float32 tiles in shared memory is shortened as the backend does (``mgpu_tile``)."""
    b, l, d, n = 2, 203, 256, 16
    block_l, _ = mgpu_tile(GpuConfig(forward="mgpu", mgpu_block_l=block_l), l, n, [4, 4, 4], 4,
                           has_keep=True, consts_rows=2)
    unroll = math.gcd(unroll, block_l)
    x = make_inputs(1, b, l, d, n, jnp.float32)
    x["initial_state"] = jnp.asarray(np.random.default_rng(2).standard_normal((b, d, n)), jnp.float32)
    seg = np.zeros((b, l), np.int32)
    seg[:, 50:] += 1
    seg = jnp.asarray(seg)
    kw = dict(delta_softplus=True, segment_ids=seg)
    y, s = jax.jit(functools.partial(selective_scan_fwd_mgpu, **kw, interpret=interpret,
                                     block_l=block_l, poly_exp=poly_exp, unroll=unroll))(**x)
    y0, s0 = jax.jit(functools.partial(selective_scan_reference, **kw))(**x)
    return {"y": rel(y, y0), "final_state": rel(s, s0), "block_l": block_l}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="CPU smoke test in interpret mode")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=None,
                   help="calls per repetition (default: enough to fill 0.2 s)")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s for the memory floor")
    p.add_argument("--sfu-per-clock", type=int, default=16,
                   help="special-function results per clock and SM, for the SFU floor")
    p.add_argument("--clock-ghz", type=float, default=None,
                   help="SM clock for the SFU floor (default: nvidia-smi's maximum)")
    p.add_argument("--budget", type=float, default=280.0,
                   help="seconds; optional variants are skipped past this")
    p.add_argument("--shapes", default=None, help="comma-separated subset of the shape names")
    p.add_argument("--no-variants", action="store_true", help="time only the default config")
    p.add_argument("--fwd-variants", default=None,
                   help="';'-separated forward variants, e.g. '16,1,4,1,1;8,1,4,1,1'")
    p.add_argument("--bwd-variants", default=None, help="';'-separated backward variants")
    p.add_argument("--skip-baselines", action="store_true", help="time only the Pallas kernel")
    p.add_argument("--skip-check", action="store_true", help="skip the float32 reference checks")
    p.add_argument("--mgpu-check-only", action="store_true",
                   help="of the float32 reference checks, run only those of the Mosaic GPU "
                        "forward (alone, and with the Triton backward)")
    p.add_argument("--sweep", default="",
                   help="GpuConfig variants timed after the main rows, comma-separated "
                        "SHAPE:SEQ_SPLITS:D_BLOCK[:UNROLL[:BWD_SEQ_SPLITS]]; with the fifth "
                        "field also forward + backward (e.g. 'jamba-v0.1:2:16:2,0:1:16:4:2'); "
                        "--shapes none times only the sweep")
    p.add_argument("--mgpu", default="",
                   help="also time the Mosaic GPU forward (pallas_mgpu), comma-"
                        "separated BLOCK_L:STAGES[:POLY_EXP[:UNROLL]] variants, e.g. "
                        "'16:2,16:2:4:16'; checked in float32 against the reference first "
                        "(the variant with the most POLY_EXP, then UNROLL); "
                        "the fastest with BLOCK_L 16 is also timed with our backward")
    args = p.parse_args()
    defaults = (None, None, 0, 1)        # BLOCK_L:STAGES[:POLY_EXP[:UNROLL]]
    mgpu_variants = [tuple(map(int, f)) + defaults[len(f):]
                     for f in (item.split(":") for item in filter(None, args.mgpu.split(",")))]
    start = time.time()
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    interpret = args.tiny
    shapes = TINY_SHAPES if args.tiny else SHAPES
    all_shapes = TINY_SHAPES if args.tiny else {**SHAPES, **EXTRA_SHAPES}
    if args.tiny and not args.sweep:   # smoke-test the sweep too: splits, d_block, unroll
        args.sweep = "tiny:2:16:2:4,0:4:8"
    if args.shapes:
        shapes = {k: v for k, v in all_shapes.items() if k in args.shapes.split(",")}
    fwd_variants = FWD_VARIANTS[:1] if args.no_variants or args.tiny else FWD_VARIANTS
    bwd_variants = BWD_VARIANTS[:1] if args.no_variants or args.tiny else BWD_VARIANTS
    parse = lambda text: [tuple(int(v) for v in item.split(",")) for item in text.split(";")]
    if args.fwd_variants:
        fwd_variants = parse(args.fwd_variants)
    if args.bwd_variants:
        bwd_variants = parse(args.bwd_variants)
    best_fv, best_bv = fwd_variants[0], bwd_variants[0]
    dev = jax.devices()[0]
    log(f"# selective_scan benchmark {datetime.date.today()} jax {jax.__version__} "
        f"device {dev.device_kind} ({dev.platform})")
    clock_hz = args.clock_ghz * 1e9 if args.clock_ghz else max_sm_clock_hz()
    log(f"# SFU floor from {num_sms()} SMs x {args.sfu_per_clock} results per clock at "
        f"{clock_hz / 1e9:.2f} GHz; memory floor at {args.bandwidth / 1e12:.2f} TB/s")
    results = {"device": dev.device_kind, "jax": jax.__version__, "rows": [], "checks": {},
               "sms": num_sms(), "clock_hz": clock_hz}
    rows = results["rows"]

    def save():
        if out_dir:
            with open(os.path.join(out_dir, "selective_scan_bench.json"), "w") as f:
                json.dump(results, f, indent=1)
            with open(os.path.join(out_dir, "selective_scan_bench.log"), "w") as f:
                f.write("\n".join(LOG) + "\n")

    try:
        checks = [  # (key, config, d)
            ("float32_vs_reference", GpuConfig(forward="triton"), 64),
            ("float32_vs_reference_splits", GpuConfig(forward="triton", **SPLIT_CHECK), 64),
            ("float32_vs_reference_mgpu", GpuConfig(forward="mgpu"), 256)]
        for key, cfg, d in ([] if args.skip_check else checks):
            if args.mgpu_check_only and cfg.forward != "mgpu":
                continue
            t = time.time()
            errs = check_small(interpret, cfg, d)
            results["checks"][key] = errs
            worst = max(errs.values())
            splits = default_seq_splits(2, 203, d, 1, cfg)
            log(f"check float32 vs reference (b=2 l=203 d={d} n=16, segments, initial state, "
                f"forward {cfg.forward}, seq splits fwd/bwd {splits[0]}/{splits[1]}): worst rel err "
                f"{worst:.2e} {'OK' if worst < 1e-4 else 'FAIL'} ({time.time() - t:.0f}s)")
            log("  " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))

        if mgpu_variants and not args.skip_check:
            K, _, poly, unroll = max(mgpu_variants, key=lambda v: (v[2], v[3]))
            try:   # a failing Mosaic GPU kernel must not stop the Triton kernels' timings
                errs = check_mgpu_small(interpret, K, poly, unroll)
            except Exception as e:
                errs = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
                traceback.print_exc()
            results["checks"]["mgpu_float32_vs_reference"] = errs
            log(f"check mgpu forward (K={K},poly={poly},unroll={unroll}) float32 vs reference "
                "(b=2 l=203 d=256 n=16, segments, initial state): "
                + " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in errs.items()))
        for name, (b, l, d, n) in shapes.items():
            x = make_inputs(7, b, l, d, n, jnp.bfloat16)
            dy = jnp.asarray(np.random.default_rng(8).standard_normal((b, l, d)), jnp.bfloat16)
            floors = {m: floor_seconds(b, l, d, n, 2, args.bandwidth, m == "fwd+bwd")
                      for m in ("fwd", "fwd+bwd")}
            sfu_floor = sfu_floor_seconds(b, l, d, n, num_sms(), clock_hz, args.sfu_per_clock)
            log(f"{name}: memory floor fwd {floors['fwd'] * 1e3:.3f} ms, fwd+bwd "
                f"{floors['fwd+bwd'] * 1e3:.3f} ms; SFU floor fwd {sfu_floor * 1e3:.3f} ms")
            ref_out = {}

            def record(impl_name, mode, fn, fargs, compare=True):
                t0 = time.time()
                try:
                    sec, out = timeit(fn, fargs, args.reps, args.inner)
                except Exception as e:  # keep going: a failed variant must not lose the rest
                    log(f"{name} {mode} {impl_name}: FAILED {type(e).__name__}: {str(e)[:2000]}")
                    traceback.print_exc()
                    return None
                row = dict(shape=name, mode=mode, impl=impl_name, ms=sec * 1e3,
                           floor_ms=floors[mode] * 1e3)
                if mode == "fwd":
                    row["sfu_floor_ms"] = sfu_floor * 1e3
                if compare and mode in ref_out:   # vs the XLA path's outputs (bf16)
                    base = ref_out[mode]
                    if mode == "fwd":
                        row["err_vs_xla"] = rel(out[0], base[0])
                    else:
                        row["err_vs_xla"] = max([rel(out[0], base[0])]
                                                + [rel(out[1][k], base[1][k]) for k in base[1]])
                rows.append(row)
                log(f"{name} {mode:8s} {impl_name:28s} {sec * 1e3:9.3f} ms  "
                    f"floor {floors[mode] * 1e3:.3f} ms"
                    + (f"  err_vs_xla {row['err_vs_xla']:.1e}" if "err_vs_xla" in row else "")
                    + f"  ({time.time() - t0:.0f}s)")
                save()
                return out

            # XLA paths first: their outputs are the comparison baseline.
            xla = functools.partial(selective_scan_xla)
            if not args.skip_baselines:
                o = record("xla", "fwd", fwd_fn(xla), (x,), compare=False)
                if o is not None:
                    ref_out["fwd"] = o
                o = record("xla", "fwd+bwd", fwd_bwd_fn(xla), (x, dy), compare=False)
                if o is not None:
                    ref_out["fwd+bwd"] = o
                del o
                record("reference", "fwd", fwd_fn(selective_scan_reference), (x,))
                record("reference", "fwd+bwd", fwd_bwd_fn(selective_scan_reference), (x, dy))

            best = None
            for i, fv in enumerate(fwd_variants):
                if i and time.time() - start > args.budget:
                    log(f"(budget) skipping forward variant {fv}")
                    continue
                cfg = gpu_cfg(fv, bwd_variants[0])
                impl = functools.partial(selective_scan_pallas_gpu, interpret=interpret,
                                         config=cfg)
                pf = (",pf" if fv[3] else "") + (",pf_bc" if len(fv) > 4 and fv[4] else "")
                S = default_seq_splits(b, l, d, 1, cfg)[0]
                label = f"pallas fwd(db={fv[0]},w={fv[1]},u={fv[2]}{pf},S={S})"
                before = len(rows)
                record(label, "fwd", fwd_fn(impl), (x,))
                if len(rows) > before and (best is None or rows[-1]["ms"] < best):
                    best, best_fv = rows[-1]["ms"], fv
            best_b = None
            for i, bv in enumerate(bwd_variants):
                if i and time.time() - start > args.budget:
                    log(f"(budget) skipping backward variant {bv}")
                    continue
                cfg = gpu_cfg(best_fv, bv)
                impl = functools.partial(selective_scan_pallas_gpu, interpret=interpret,
                                         config=cfg)
                S, SB = default_seq_splits(b, l, d, 1, cfg)
                label = f"pallas bwd(db={bv[0]},w={bv[1]},K={bv[2]}/{bv[3]},S={SB};fwd S={S})"
                before = len(rows)
                record(label, "fwd+bwd", fwd_bwd_fn(impl), (x, dy))
                if len(rows) > before and (best_b is None or rows[-1]["ms"] < best_b):
                    best_b, best_bv = rows[-1]["ms"], bv
            best_m = None    # (ms, K, stages, poly_exp, unroll) usable with our backward
            for K, stages, poly, unroll in (mgpu_variants if d % 128 == 0 else []):
                impl = functools.partial(selective_scan_fwd_mgpu, block_l=K, poly_exp=poly,
                                         unroll=unroll, max_concurrent_steps=stages,
                                         interpret=interpret)
                before = len(rows)
                record(f"mgpu fwd(K={K},stages={stages},poly={poly},unroll={unroll})", "fwd",
                       fwd_fn(impl), (x,))
                chunk = gpu_cfg(best_fv, best_bv).chunk      # the backward's checkpoints
                if (len(rows) > before and K % chunk == 0 and chunk % unroll == 0
                        and (best_m is None or rows[-1]["ms"] < best_m[0])):
                    best_m = (rows[-1]["ms"], K, stages, poly, unroll)
            if best_m is not None:           # its checkpoints (every chunk) + our backward
                _, K, stages, poly, unroll = best_m
                cfg = dataclasses.replace(gpu_cfg(best_fv, best_bv), forward="mgpu",
                                          mgpu_block_l=K, mgpu_stages=stages,
                                          mgpu_poly_exp=poly, mgpu_unroll=unroll)
                impl = functools.partial(selective_scan_pallas_gpu, interpret=interpret,
                                         config=cfg)
                record(f"mgpu fwd(K={K},stages={stages},poly={poly},unroll={unroll}) + pallas bwd",
                       "fwd+bwd", fwd_bwd_fn(impl), (x, dy))
            # later shapes: only the fastest variants
            fwd_variants, bwd_variants = [best_fv], [best_bv]
            del x, dy, ref_out

        sweep(args, all_shapes, fwd_variants[0], bwd_variants[0], interpret, start, rows, save)
        if args.tiny:
            t = time.time()
            kernels = lower_check([None, GpuConfig(seq_splits=4, bwd_seq_splits=4)])
            results["checks"]["cuda_lowering_jamba"] = kernels
            log(f"cross-lowered forward + backward for CUDA at jamba-v0.1 (Triton kernels per "
                f"module): {kernels} ({time.time() - t:.0f}s)")
    finally:
        results["elapsed_s"] = time.time() - start
        save()
        summary(rows)
        save()


def lower_check(configs):
    """Cross-lower forward + backward at the Jamba-v0.1 shape for CUDA (the Triton lowering of
    every kernel runs; no GPU needed).  Returns {label: Triton kernels in the module}."""
    b, l, d, n = SHAPES["jamba-v0.1"]
    T, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    x = dict(u=T((b, l, d), bf), delta=T((b, l, d), bf), A=T((d, n), f32), B=T((b, l, n), bf),
             C=T((b, l, n), bf), D=T((d,), f32), z=T((b, l, d), bf), delta_bias=T((d,), f32))
    out = {}
    for cfg in configs:
        impl = functools.partial(selective_scan_pallas_gpu, config=cfg)
        S, SB = default_seq_splits(b, l, d, 1, cfg)
        with cuda_target():
            text = fwd_bwd_fn(impl).trace(x, T((b, l, d), bf)).lower(
                lowering_platforms=("cuda",)).as_text()
        out[f"seq splits fwd/bwd {S}/{SB}"] = text.count("__gpu$xla.gpu.triton")
    return out


def sweep(args, shapes, fv, bv, interpret, start, rows, save):
    """--sweep: GpuConfig variants (sequence splits, d_block, unroll), forward and optionally
    forward + backward, on top of the given forward / backward variant.  Each output is
    compared with the first sweep item's of the same shape and mode (``err_vs_first``)."""
    import dataclasses
    names = list(shapes)
    inputs, first = {}, {}
    for item in filter(None, args.sweep.split(",")):
        if time.time() - start > args.budget:
            log(f"(budget) skipping sweep {item}")
            continue
        fields = item.split(":")
        name = names[int(fields[0])] if fields[0].isdigit() else fields[0]
        if name not in shapes:
            log(f"sweep {item}: unknown shape {name!r} (have {names})")
            continue
        splits, d_block = int(fields[1]), int(fields[2])
        unroll = int(fields[3]) if len(fields) > 3 else fv[2]
        bwd_splits = int(fields[4]) if len(fields) > 4 else None
        b, l, d, n = shapes[name]
        cfg = dataclasses.replace(gpu_cfg(fv, bv), seq_splits=splits, fwd_d_block=d_block,
                                  unroll=unroll, bwd_seq_splits=bwd_splits)
        S, SB = default_seq_splits(b, l, d, 1, cfg)
        if name not in inputs:
            inputs.clear()
            inputs[name] = (make_inputs(7, b, l, d, n, jnp.bfloat16),
                            jnp.asarray(np.random.default_rng(8).standard_normal((b, l, d)),
                                        jnp.bfloat16))
        x, dy = inputs[name]
        impl = functools.partial(selective_scan_pallas_gpu, interpret=interpret, config=cfg)
        modes = [("fwd", fwd_fn(impl), (x,))]
        if bwd_splits is not None:
            modes.append(("fwd+bwd", fwd_bwd_fn(impl), (x, dy)))
        label = f"pallas sweep(db={d_block},u={unroll},S={S}" + (
            f",bwd S={SB})" if bwd_splits is not None else ")")
        for mode, fn, fargs in modes:
            t0 = time.time()
            try:
                sec, out = timeit(fn, fargs, args.reps, args.inner)
            except Exception as e:  # keep going: a failed variant must not lose the rest
                log(f"sweep {item} {mode}: FAILED {type(e).__name__}: {str(e)[:2000]}")
                traceback.print_exc()
                continue
            leaves = [out[0]] + ([out[1][k] for k in sorted(out[1])] if mode == "fwd+bwd" else [])
            base = first.setdefault((name, mode), leaves)
            err = max(rel(a, r) for a, r in zip(leaves, base))
            floor = floor_seconds(b, l, d, n, 2, args.bandwidth, mode == "fwd+bwd")
            rows.append(dict(shape=name, mode=mode, impl=label, ms=sec * 1e3,
                             floor_ms=floor * 1e3, sweep=item, err_vs_first=err))
            log(f"[{time.time() - start:6.1f}s] sweep {name} {mode:8s} {label:36s} "
                f"{sec * 1e3:9.3f} ms  floor {floor * 1e3:.3f} ms  err_vs_first {err:.1e}  "
                f"({time.time() - t0:.0f}s)")
            save()


def summary(rows):
    log("\n## selective_scan summary (ms, median)")
    log(f"{'shape':11s} {'mode':8s} {'pallas best':>11s} {'xla':>9s} {'lax.scan':>9s} "
        f"{'speedup':>8s} {'floor':>7s} {'x floor':>7s}  best pallas config")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            ours = [r for r in sel if r["impl"].startswith("pallas")]
            get = lambda name: next((r["ms"] for r in sel if r["impl"] == name), float("nan"))
            if not sel:
                continue
            xla_ms, ref_ms = get("xla"), get("reference")
            floor = sel[0]["floor_ms"]
            if ours:
                b = min(ours, key=lambda r: r["ms"])
                base = min(xla_ms, ref_ms) if xla_ms == xla_ms or ref_ms == ref_ms else float("nan")
                log(f"{shape:11s} {mode:8s} {b['ms']:11.3f} {xla_ms:9.2f} {ref_ms:9.2f} "
                    f"{base / b['ms']:7.1f}x {floor:7.3f} {b['ms'] / floor:6.2f}x  {b['impl']}")
            else:
                log(f"{shape:11s} {mode:8s} {'n/a':>11s} {xla_ms:9.2f} {ref_ms:9.2f}")
            mgpu = [r for r in sel if r["impl"].startswith("mgpu")]
            if mgpu:
                b = min(mgpu, key=lambda r: r["ms"])
                log(f"{shape:11s} {mode:8s} {b['ms']:11.3f} (Mosaic GPU forward) "
                    f"{b['ms'] / floor:6.2f}x floor  {b['impl']}")
            fwd_rows = [r for r in sel if "sfu_floor_ms" in r and r["impl"] not in ("xla", "reference")]
            if fwd_rows:
                b = min(fwd_rows, key=lambda r: r["ms"])
                log(f"{shape:11s} {mode:8s} SFU floor {b['sfu_floor_ms']:.3f} ms "
                    f"({b['sfu_floor_ms'] / floor:.2f}x the memory floor); fastest forward at "
                    f"{b['ms'] / b['sfu_floor_ms']:.2f}x it")


if __name__ == "__main__":
    main()
