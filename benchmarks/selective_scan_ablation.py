"""Where the Mosaic GPU selective-scan forward spends its time: the kernel timed with one part
left out or made cheap at a time; the differences place the time without hardware counters.
The ablated kernels compute wrong values; they are for timing only.

    python benchmarks/selective_scan_ablation.py            # on a Hopper GPU
    python benchmarks/selective_scan_ablation.py --tiny     # CPU: interpret mode, a smoke test
    ncu -k regex:mosaic -c 1 python benchmarks/selective_scan_ablation.py --variants kernel \
        --shapes jamba-v0.1 --reps 1 --inner 1              # a profiler's view of one call

Variants (each patches ``pallas_mgpu`` for one compile, then restores it):
  kernel          the forward as shipped (``selective_scan_fwd_mgpu``, 64-step tiles, unroll 16)
  fma_exp         every 2^x of the recurrence and the gate an FMA instead of a MUFU.EX2
                  (softplus's 2^x and the gate's rsqrt stay): what the special-function unit costs
  bc_per_group    B[t, :] and C[t, :] read from shared memory once per group of unrolled steps
                  instead of every step: what the per-step broadcast loads cost
  l2_inputs       every tile's TMA reads tile 0 (served from L2): what HBM reads cost
  copy_only       no recurrence, y = u + delta: the TMA pipeline alone
  chained         the kernel as shipped, CHAIN forwards in one jitted program (each one's y
                  the next one's u), per forward: a call's cost with no dispatch or
                  synchronisation between calls (the other rows spread theirs over a repetition)
Rows: Jamba-v0.1 and mamba-130m layer shapes, bf16, median of --reps repetitions of --inner
calls (``benchmarks/selective_scan.py``'s timer and inputs), with the SM clock and power
sampled during the timing.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

import benchmarks.selective_scan as bench  # noqa: E402
from pallas_kernels.selective_scan import pallas_mgpu  # noqa: E402

f32 = jnp.float32


def _namespace(module, **overrides):
    """A stand-in for ``module`` whose listed attributes are replaced."""
    ns = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    for k, v in overrides.items():
        setattr(ns, k, v)
    return ns


class _PerGroup:
    """A ref whose [t, i] reads return [first step of t's group, i]."""

    def __init__(self, ref, group):
        self.ref, self.group = ref, group

    def __getitem__(self, idx):
        t, i = idx
        return self.ref[t - lax.rem(t, self.group), i]


def _bc_per_group(real):
    def recurrence(cfg, A2, Dv, bias, s, u_ref, dt_ref, B_ref, C_ref, *rest):
        return real(cfg, A2, Dv, bias, s, u_ref, dt_ref, _PerGroup(B_ref, cfg.unroll),
                    _PerGroup(C_ref, cfg.unroll), *rest)
    return recurrence


def _copy_only(cfg, A2, Dv, bias, s, u_ref, dt_ref, B_ref, C_ref, z_ref, keep_ref, y_ref, h,
               start, stop):
    def group(k, h):
        ts = [start + k * cfg.unroll + j for j in range(cfg.unroll)]
        ys = [u_ref[t, :].astype(f32) + dt_ref[t, :].astype(f32) for t in ts]
        for t, y in zip(ts, ys):
            y_ref[t, :] = y.astype(y_ref.dtype)
        return h
    return lax.fori_loop(0, (stop - start) // cfg.unroll, group, h)


VARIANTS = {
    "kernel": {},
    "fma_exp": {"jnp": _namespace(jnp, exp2=lambda a: a * 1e-3 + 0.999)},
    "bc_per_group": {"_recurrence": _bc_per_group(pallas_mgpu._recurrence)},
    "l2_inputs": {"pl": _namespace(pl, BlockSpec=lambda shape, index_map: pl.BlockSpec(
        shape, lambda s: index_map(s * 0)))},
    "copy_only": {"_recurrence": _copy_only},
    "chained": {},
}


def _chained(impl, count):
    def f(x):
        u = x["u"]
        for _ in range(count):
            y, s = impl(**{**x, "u": u}, delta_softplus=True)
            u = y
        return y, s
    return jax.jit(f)


class SmClockLog:
    """nvidia-smi's SM clock and board power, sampled every 10 ms while a row is timed: the
    clock under sustained load, which a reading taken before or after the timings (idle, at the
    maximum boost clock) does not show.  ``summary`` is "" where nvidia-smi is absent."""

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 "-lms", "10"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc):
        self.summary = ""
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate()
        samples = []
        for line in out.splitlines():
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:
                continue
            samples.append((mhz, watts))
        if samples:
            mhz, watts = zip(*samples)
            self.summary = (f"SM clock median {statistics.median(mhz):.0f} MHz (min {min(mhz):.0f}), "
                            f"power median {statistics.median(watts):.0f} W, {len(samples)} samples")


def time_variant(name, x, args, interpret):
    saved = {k: getattr(pallas_mgpu, k) for k in VARIANTS[name]}
    try:
        for k, v in VARIANTS[name].items():
            setattr(pallas_mgpu, k, v)
        jax.clear_caches()
        impl = functools.partial(pallas_mgpu.selective_scan_fwd_mgpu, block_l=args.block_l,
                                 unroll=args.unroll, interpret=interpret)
        calls = args.chain if name == "chained" else 1
        fn = _chained(impl, calls) if name == "chained" else bench.fwd_fn(impl)
        jax.block_until_ready(fn(x))                  # compiled before the clock is sampled
        with SmClockLog() as clock:
            sec, (y, _) = bench.timeit(fn, (x,), args.reps, args.inner)
        return sec * 1e3 / calls, y, clock.summary
    finally:
        for k, v in saved.items():
            setattr(pallas_mgpu, k, v)
        jax.clear_caches()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="CPU smoke test in interpret mode")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=None, help="calls per repetition (default: 0.2 s)")
    p.add_argument("--block-l", type=int, default=64)
    p.add_argument("--unroll", type=int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--chain", type=int, default=8, help="forwards in one program for 'chained'")
    p.add_argument("--shapes", default=",".join(bench.SHAPES), help="comma-separated shape names")
    args = p.parse_args()
    shapes = ({"tiny": (1, 64, 128, 16)} if args.tiny
              else {k: bench.SHAPES[k] for k in args.shapes.split(",")})
    if args.tiny:
        args.block_l, args.unroll, args.reps, args.inner, args.chain = 32, 8, 1, 1, 2
    dev = jax.devices()[0]
    print(f"# selective_scan ablation, jax {jax.__version__}, {dev.device_kind}, "
          f"block_l {args.block_l}, unroll {args.unroll}", flush=True)
    table = []
    for shape_name, shape in shapes.items():
        x = bench.make_inputs(7, *shape, f32 if args.tiny else jnp.bfloat16)
        y_kernel = None
        for name in args.variants.split(","):
            ms, y, clock = time_variant(name, x, args, args.tiny)
            if name == "kernel":
                y_kernel = y
            # an ablation whose y equals the kernel's did not take effect
            diff = f"y differs from the kernel's by {bench.rel(y, y_kernel):.1e}" if y_kernel is not None else ""
            table.append((shape_name, name, ms))
            print(f"{shape_name:11s} {name:13s} {ms:8.3f} ms  {diff}  {clock}", flush=True)
    base = {s: ms for s, n, ms in table if n == "kernel"}
    print("\nshape       variant       ms      vs kernel")
    for shape_name, name, ms in table:
        ratio = f"{ms / base[shape_name]:6.2f}" if shape_name in base else ""
        print(f"{shape_name:11s} {name:13s} {ms:7.3f} {ratio}")


if __name__ == "__main__":
    main()
