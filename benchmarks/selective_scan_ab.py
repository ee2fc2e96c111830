"""Same-run A/B of the selective-scan GPU kernels: an earlier version of the kernel module
against the current one, in one process, on the benchmark's inputs and timer.

    git show REV:pallas_kernels/selective_scan/pallas_gpu.py > /tmp/pallas_gpu_before.py
    python benchmarks/selective_scan_ab.py /tmp/pallas_gpu_before.py     # on a GPU
    python benchmarks/selective_scan_ab.py /tmp/pallas_gpu_before.py --tiny   # CPU, interpret

The earlier module is copied into the package (it imports its siblings relatively) for the
run and removed after.  Before timing, the current module is checked on the device against
the sequential reference in float32 (``benchmarks/selective_scan.py``'s ``check_small``).
Rows: forward and forward + backward at the Jamba-v0.1 and mamba-130m layer shapes, median of
``--reps`` repetitions of ``--inner`` back-to-back calls, with the relative error of the
current module's outputs against the earlier one's.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import benchmarks.selective_scan as bench  # noqa: E402
from pallas_kernels.selective_scan import pallas_gpu  # noqa: E402

PACKAGE_DIR = os.path.dirname(pallas_gpu.__file__)
BASELINE = "_ab_baseline"


def load_baseline(path):
    target = os.path.join(PACKAGE_DIR, BASELINE + ".py")
    shutil.copyfile(path, target)
    try:
        return importlib.import_module(f"pallas_kernels.selective_scan.{BASELINE}")
    finally:
        os.remove(target)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("baseline", help="an earlier pallas_gpu.py")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test in interpret mode")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=None, help="calls per repetition (default: 0.2 s)")
    args = p.parse_args()
    modules = {"before": load_baseline(args.baseline), "after": pallas_gpu}
    shapes = bench.TINY_SHAPES if args.tiny else bench.SHAPES
    errs = bench.check_small(args.tiny)
    print(f"check float32 vs reference (current module): worst rel err {max(errs.values()):.1e}")
    lines = []
    for shape, (b, l, d, n) in shapes.items():
        x = bench.make_inputs(7, b, l, d, n, jnp.bfloat16)
        dy = jnp.asarray(np.random.default_rng(8).standard_normal((b, l, d)), jnp.bfloat16)
        for mode in ("fwd", "fwd+bwd"):
            outs = {}
            for name, module in modules.items():
                impl = functools.partial(module.selective_scan_pallas_gpu, interpret=args.tiny)
                fn, fargs = ((bench.fwd_fn(impl), (x,)) if mode == "fwd"
                             else (bench.fwd_bwd_fn(impl), (x, dy)))
                sec, outs[name] = bench.timeit(fn, fargs, args.reps, args.inner)
                line = f"{shape:11s} {mode:8s} {name:7s} {sec * 1e3:9.3f} ms"
                if name == "after":
                    a, o = outs["after"], outs["before"]
                    err = bench.rel(a[0], o[0])
                    if mode != "fwd":
                        err = max([err] + [bench.rel(a[1][k], o[1][k]) for k in o[1]])
                    line += f"  rel err vs before {err:.1e}"
                lines.append(line)
                print(line, flush=True)
    print("\n## selective_scan A/B (ms, median)\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
