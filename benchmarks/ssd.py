"""Benchmark of the Mamba-2 SSD op on one GPU: our Pallas kernel, our XLA path and the peers.

Run on the GPU machine from the project root (peers from ``bash ../shared/peers/get_peers.sh``):

    PYTHONPATH=.:.peers python benchmarks/ssd.py            # check + the default shapes

In one process and on the same inputs it

1. checks our Pallas backend against our XLA backend on the GPU (every option at once: D (h, p),
   z, dt_bias + softplus + dt_limit, initial state, segment ids, l not a chunk multiple, g > 1;
   values and the gradients of every differentiable input; float32 and bf16), and our forward
   against mamba_ssm's on the first benchmark shape;
2. times, for each shape, the forward and forward+backward of: ours (``impl="pallas"``), ours
   (``impl="xla"``), mamba_ssm's ``mamba_chunk_scan_combined`` and fla's ``chunk_simple_gla``
   (given the SSD as gated linear attention: q = C, k = B expanded to all heads, v = x * dt,
   g = A * dt; its inputs are prepared outside the timed region).

The call timed is a Mamba-2 layer's: bf16 x, dt, B, C; float32 A, D (h,), dt_bias;
dt_softplus=True; no z (Mamba-2 gates in its RMSNorm), no initial state.  Forward+backward
computes the gradients of every input for a random output cotangent.

Timing: torch via ``triton.testing.do_bench`` (median, L2 flushed between runs); JAX via
blocks of ``--inner`` back-to-back calls ended by ``block_until_ready`` (median over ``--reps``
blocks, after warm-up).  TFLOP/s use one nominal count for everybody (the chunked algorithm at
chunk Q: 2 b l (g Q n + h Q p + 2 h p n) forward, twice that backward); "floor" is the
memory-traffic floor: bytes of x, B, C, dt read once and y written once (forward; the backward
adds dy, x, B, C, dt read and dx, dB, dC, ddt written) over ``--bandwidth`` bytes/s.
Full logs go to $OUT/ when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.path.isdir(os.path.join(ROOT, ".peers")):
    sys.path.insert(0, os.path.join(ROOT, ".peers"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.ssd import ssd  # noqa: E402

# (b, l, h, p, n, g, chunk): the three shapes of ../shared/peers/README.md, then more lengths.
SHAPES = [
    (4, 4096, 80, 64, 128, 1, 256),
    (2, 4096, 128, 64, 128, 8, 256),
    (1, 16384, 64, 64, 128, 1, 256),
    (8, 2048, 80, 64, 128, 1, 256),
]

LOG = []
PALLAS_KW = {}   # {"interpret": True} with --tiny (a CPU smoke test of this script)


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)
    if os.environ.get("OUT"):   # incremental, so a run cut short still leaves its log
        with open(os.path.join(os.environ["OUT"], "ssd_bench.log"), "a") as fh:
            fh.write(line + "\n")


def rel_l2(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


# --------------------------------------------------------------------------- inputs
def make_inputs(shape, seed=0):
    b, l, h, p, n, g, _ = shape
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)
    return dict(
        x=f(b, l, h, p), dt=(f(b, l, h) * 0.5 - 3.0),  # softplus(dt + bias) ~ 0.01 .. 0.3
        A=-np.exp(rng.uniform(np.log(1.0), np.log(16.0), h)).astype(np.float32),
        B=f(b, l, g, n), C=f(b, l, g, n), D=f(h), dt_bias=(0.5 * f(h)).astype(np.float32),
        dy=f(b, l, h, p),
    )


LOW = ("x", "dt", "B", "C", "dy")


def to_jax(inp, dtype=jnp.bfloat16):
    return {k: jnp.asarray(v, dtype if k in LOW else jnp.float32) for k, v in inp.items()}


# --------------------------------------------------------------------------- timing
def time_jax(fn, args, reps=20, target_ms=20.0):
    """Median ms per call: blocks of back-to-back calls (enough for ~target_ms) ended by
    block_until_ready, after compilation and warm-up."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    one = (time.perf_counter() - t0) / 3 * 1e3
    inner = max(1, min(20, int(target_ms / max(one, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(times)


def jax_fns(impl, chunk, **kw):
    def fwd(x, dt, A, B, C, D, dt_bias):
        return ssd(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                   impl=impl, **(kw if impl != "pallas" else {**PALLAS_KW, **kw}))

    def fwd_bwd(x, dt, A, B, C, D, dt_bias, dy):
        y, vjp = jax.vjp(fwd, x, dt, A, B, C, D, dt_bias)
        return y, vjp(dy)

    return jax.jit(fwd), jax.jit(fwd_bwd)


# --------------------------------------------------------------------------- peers
def load_peers():
    peers = {}
    try:
        import torch  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        peers["mamba_ssm"] = mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001
        log(f"note: mamba_ssm unavailable ({type(e).__name__}: {e}); skipped")
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        peers["fla"] = chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        log(f"note: fla unavailable ({type(e).__name__}: {e}); skipped")
    return peers


def torch_inputs(inp):
    import torch
    dev = "cuda"
    t = {k: torch.tensor(v, device=dev, dtype=torch.bfloat16 if k in LOW else torch.float32)
         for k, v in inp.items()}
    return t


def time_mamba(fn, t, chunk, do_bench):
    import torch
    args = {k: t[k].detach().clone().requires_grad_(k != "dy") for k in t}
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]

    def fwd():
        return fn(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk, D=args["D"],
                  dt_bias=args["dt_bias"], dt_softplus=True)

    def fwd_bwd():
        y = fwd()
        return torch.autograd.grad(y, [args[k] for k in names], args["dy"])

    with torch.no_grad():
        t_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    return t_f, t_fb


def time_fla(fn, t, h, do_bench):
    import torch
    import torch.nn.functional as F
    g = t["B"].shape[2]
    rep = h // g
    dt = F.softplus(t["dt"].float() + t["dt_bias"])
    q = t["C"].repeat_interleave(rep, dim=2).contiguous()
    k = t["B"].repeat_interleave(rep, dim=2).contiguous()
    v = (t["x"].float() * dt[..., None]).to(torch.bfloat16).contiguous()
    gl = (dt * t["A"]).contiguous()
    q, k, v, gl = (a.detach().requires_grad_() for a in (q, k, v, gl))

    def fwd():
        return fn(q, k, v, g=gl, scale=1.0)[0]

    def fwd_bwd():
        o = fwd()
        return torch.autograd.grad(o, [q, k, v, gl], t["dy"])

    with torch.no_grad():
        t_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    return t_f, t_fb


# --------------------------------------------------------------------------- checks
def check_against_xla():
    """Pallas vs XLA on the GPU with every option on; returns True if all pass."""
    ok = True
    b, l, h, p, n, g, chunk = (2, 999, 8, 64, 128, 2, 256) if not PALLAS_KW else (
        1, 99, 4, 16, 16, 2, 32)
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)
    base = dict(x=f(b, l, h, p), dt=f(b, l, h) * 0.5 - 3.0,
                A=-np.exp(rng.uniform(0, np.log(16.0), h)).astype(np.float32),
                B=f(b, l, g, n), C=f(b, l, g, n), D=f(h, p), z=f(b, l, h, p),
                dt_bias=0.5 * f(h), initial_state=f(b, h, p, n))
    seg = np.zeros((b, l), np.int32)
    for s in (100, 300, 301, 511, 512, 700):
        seg[0, s % l:] += 1
    seg[-1, 450 % l:] = 7
    seg = jnp.asarray(seg)
    cot_y, cot_s = f(b, l, h, p), f(b, h, p, n)

    for dtype, tol_y, tol_g in ((jnp.float32, 1e-4, 1e-4), (jnp.bfloat16, 1e-2, 2e-2)):
        inp = {k: jnp.asarray(v, dtype if k in ("x", "dt", "B", "C", "z") else jnp.float32)
               for k, v in base.items()}

        def run(impl, inp=inp, dtype=dtype):
            def f_(d):
                kw = PALLAS_KW if impl == "pallas" else {}
                return ssd(**d, chunk_size=chunk, dt_softplus=True, dt_limit=(0.005, 0.5),
                           segment_ids=seg, return_final_state=True, impl=impl, **kw)
            out, vjp = jax.vjp(f_, inp)
            return out, vjp((jnp.asarray(cot_y, dtype), jnp.asarray(cot_s)))[0]

        (y, s), gr = jax.jit(lambda: run("pallas"))()
        # Reference: the XLA path on float32 copies of the same values.
        inp32 = {k: v.astype(jnp.float32) for k, v in inp.items()}
        (y0, s0), g0 = jax.jit(lambda: run("xla", inp32, jnp.float32))()
        errs = {"y": rel_l2(y, y0), "final_state": rel_l2(s, s0)}
        errs.update({f"d{k}": rel_l2(gr[k], g0[k]) for k in g0})
        bad = {k: v for k, v in errs.items() if not v < (tol_y if k in ("y", "final_state")
                                                         else tol_g)}
        ok &= not bad
        log(f"check pallas vs xla ({jnp.dtype(dtype).name}): " +
            " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + ("  FAIL" if bad else "  ok"))
    return ok


def check_against_mamba(peers, shape, inp):
    if "mamba_ssm" not in peers:
        return
    import torch
    t = torch_inputs(inp)
    _, l, h, p, n, g, chunk = shape
    y_m = peers["mamba_ssm"](t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                             dt_bias=t["dt_bias"], dt_softplus=True)
    j = to_jax(inp)
    y = ssd(j["x"], j["dt"], j["A"], j["B"], j["C"], chunk_size=chunk, D=j["D"],
            dt_bias=j["dt_bias"], dt_softplus=True, impl="pallas")
    y_x = ssd(*(j[k].astype(jnp.float32) for k in ("x", "dt", "A", "B", "C")), chunk_size=chunk,
              D=j["D"], dt_bias=j["dt_bias"], dt_softplus=True, impl="xla")
    y_m = y_m.float().cpu().numpy()
    log(f"check on {shape}: rel_l2(ours, xla f32)={rel_l2(y, y_x):.1e}  "
        f"rel_l2(mamba_ssm, xla f32)={rel_l2(y_m, y_x):.1e}  rel_l2(ours, mamba_ssm)="
        f"{rel_l2(y, y_m):.1e}")


# --------------------------------------------------------------------------- main
def nominal_flops(shape):
    b, l, h, p, n, g, q = shape
    fwd = 2 * b * l * (g * q * n + h * q * p + 2 * h * p * n)
    return fwd, 3 * fwd


def floor_bytes(shape):
    b, l, h, p, n, g, _ = shape
    xb, bc, dtb = b * l * h * p * 2, 2 * b * l * g * n * 2, b * l * h * 2
    fwd = xb + bc + dtb + xb
    bwd = (2 * xb + bc + dtb) + (xb + bc + dtb)
    return fwd, fwd + bwd


def time_ours_variant(shape, j, opt):
    """Forward and forward+backward times of the GPU kernels with explicit options (--sweep)."""
    from pallas_kernels.ssd.pallas_gpu import ssd_pallas_gpu
    chunk = shape[-1]

    def fwd(x, dt, A, B, C, D, dt_bias):
        return ssd_pallas_gpu(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias,
                              dt_softplus=True, options=opt)[0]

    def fwd_bwd(x, dt, A, B, C, D, dt_bias, dy):
        y, vjp = jax.vjp(fwd, x, dt, A, B, C, D, dt_bias)
        return vjp(dy)

    jargs = [j[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
    return time_jax(jax.jit(fwd), jargs), time_jax(jax.jit(fwd_bwd), jargs + [j["dy"]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all",
                    help="'all', 'none' (checks only) or comma-separated indices")
    ap.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s for the floor")
    ap.add_argument("--budget", type=float, default=1e9,
                    help="seconds: later phases (sweep, xla, check) are skipped past it")
    ap.add_argument("--check", choices=("first", "last", "none"), default="first",
                    help="when to run the correctness checks")
    ap.add_argument("--no-xla", action="store_true")
    ap.add_argument("--sweep", default="", help="GPU option variants to also time, forward and "
                    "forward+backward: comma-separated SHAPE:SEQ_SPLITS:BLOCK_P (e.g. '2:4:64')")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, interpret")
    args = ap.parse_args()
    t_start = time.time()
    over = lambda: time.time() - t_start > args.budget
    if args.tiny:
        SHAPES[:] = [(1, 256, 4, 32, 32, 1, 64)]
        PALLAS_KW["interpret"] = True
    out_dir = os.environ.get("OUT")

    log(f"jax {jax.__version__}, devices {jax.devices()}")
    peers = load_peers()
    do_bench = None
    if peers:
        import torch
        from triton.testing import do_bench
        log(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    checks = {}

    def run_checks():
        try:
            checks["xla"] = check_against_xla()
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())
            checks["xla"] = False

    if args.check == "first":
        run_checks()

    idx = (range(len(SHAPES)) if args.shapes == "all" else [] if args.shapes == "none"
           else [int(i) for i in args.shapes.split(",")])
    shapes = [SHAPES[i] for i in idx]
    results = {shape: {} for shape in shapes}
    inputs = {}

    def report(shape, name, t_f, t_fb):
        results[shape][name] = (t_f, t_fb)
        fl_f, fl_fb = nominal_flops(shape)
        by_f, by_fb = floor_bytes(shape)
        fmt = lambda t, fl, by: ("—" if t is None else
                                 f"{t:8.3f} ms {fl / t / 1e9:6.1f} TFLOP/s floor "
                                 f"{by / args.bandwidth * 1e3 / t:5.2f}")
        log(f"[{time.time() - t_start:6.1f}s] {str(shape):36s} {name:14s} fwd {fmt(t_f, fl_f, by_f)}"
            f" | fwd+bwd {fmt(t_fb, fl_fb, by_fb)}")

    # Phase 1: ours and the peers, shape by shape.
    for si, shape in enumerate(shapes):
        if si >= 3 and over():
            log(f"{shape}: skipped (time budget)")
            continue
        b, l, h, p, n, g, chunk = shape
        inp = inputs[shape] = make_inputs(shape)
        j = to_jax(inp)
        jargs = [j[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
        try:
            f, fb = jax_fns("pallas", chunk)
            report(shape, "ours", time_jax(f, jargs), time_jax(fb, jargs + [j["dy"]]))
        except Exception:  # noqa: BLE001
            log(f"ours failed on {shape}:\n{traceback.format_exc()}")
        del j, jargs
        if peers:
            t = torch_inputs(inp)
            for name, fn in (("mamba_ssm", time_mamba), ("fla", time_fla)):
                if name not in peers:
                    continue
                try:
                    report(shape, name, *(fn(peers[name], t, chunk, do_bench)
                                          if name == "mamba_ssm" else
                                          fn(peers[name], t, h, do_bench)))
                except Exception:  # noqa: BLE001
                    log(f"{name} failed on {shape}:\n{traceback.format_exc()}")
            del t

    # Phase 2: variants of the GPU options (sequence splits, p block).
    for item in filter(None, args.sweep.split(",")):
        import dataclasses
        from pallas_kernels.ssd import pallas_gpu as pg
        si, splits, block_p = (int(v) for v in item.split(":"))
        shape = SHAPES[si]
        b, l, h, p, n, g, chunk = shape
        if over():
            log(f"sweep {item}: skipped (time budget)")
            continue
        j = to_jax(inputs.get(shape) or make_inputs(shape))
        base = pg.default_options(b, h, p, g, -(-l // 64), interpret=bool(PALLAS_KW))
        opt = dataclasses.replace(base, seq_splits=splits, block_p=block_p)
        try:
            t_f, t_fb = time_ours_variant(shape, j, opt)
            log(f"[{time.time() - t_start:6.1f}s] sweep {str(shape):36s} seq_splits={splits} "
                f"block_p={block_p} (default {base.seq_splits}, {base.block_p}): fwd {t_f:.3f} ms "
                f"fwd+bwd {t_fb:.3f} ms")
        except Exception:  # noqa: BLE001
            log(f"sweep {item} failed:\n{traceback.format_exc()}")

    # Phase 3: our XLA path.
    for shape in ([] if args.no_xla else shapes):
        if over():
            log(f"xla on {shape}: skipped (time budget)")
            continue
        j = to_jax(inputs[shape])
        jargs = [j[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
        try:
            f, fb = jax_fns("xla", shape[-1])
            report(shape, "xla", time_jax(f, jargs, reps=5), time_jax(fb, jargs + [j["dy"]], reps=5))
        except Exception:  # noqa: BLE001
            log(f"xla failed on {shape}:\n{traceback.format_exc()}")

    if args.check == "last":
        if over():
            log("checks: skipped (time budget)")
        else:
            run_checks()

    # Short table last.
    log("")
    log(f"SSD on {jax.devices()[0].device_kind}: median ms (ratio = mamba_ssm time / ours); "
        f"ours/floor = memory-traffic floor at {args.bandwidth / 1e12:.1f} TB/s / our fwd time")
    log("| shape (b,l,h,p,n,g,Q) | ours fwd | ours f+b | xla fwd | xla f+b | mamba fwd | "
        "mamba f+b | fla fwd | fla f+b | ratio fwd | ratio f+b | floor/ours fwd |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "—" if v is None else f"{v:.3f}"
    for shape in shapes:
        res = results[shape]
        get = lambda k, i: res[k][i] if k in res else None
        of, ofb = get("ours", 0), get("ours", 1)
        mf, mfb = get("mamba_ssm", 0), get("mamba_ssm", 1)
        rf = f"{mf / of:.2f}" if of and mf else "—"
        rfb = f"{mfb / ofb:.2f}" if ofb and mfb else "—"
        floor_f = floor_bytes(shape)[0] / args.bandwidth * 1e3
        fl = f"{floor_f / of:.2f}" if of else "—"
        log(f"| {','.join(map(str, shape))} | {fmt(of)} | {fmt(ofb)} | {fmt(get('xla', 0))} | "
            f"{fmt(get('xla', 1))} | {fmt(mf)} | {fmt(mfb)} | {fmt(get('fla', 0))} | "
            f"{fmt(get('fla', 1))} | {rf} | {rfb} | {fl} |")
    log(f"checks: {checks if checks else 'not run'}; total {time.time() - t_start:.0f} s")
    if out_dir:
        with open(os.path.join(out_dir, "ssd_bench.json"), "w") as fh:
            json.dump([dict(shape=s_, res=results[s_]) for s_ in shapes], fh, indent=1)


if __name__ == "__main__":
    main()
