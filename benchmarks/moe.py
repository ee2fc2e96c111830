"""MoE sublayer on one GPU: how XLA lowers ``jax.lax.ragged_dot`` and what the expert compute costs.

The layer is the routed part of ``configs/train/mamba2-hybrid-moe-2b.yaml``'s MoE (d_model 2048, 8
SwiGLU experts of d_ff 4096, top-2), on ``--batch`` rows of ``--seq`` tokens (one GPU's share in
``benchmarks/multi_gpu.py``), bf16 compute on float32 weights. Timed: the forward alone and forward +
backward (gradients of x and of every weight), for

* ``impl="ragged"`` (``jamba_jax.layers.moe.grouped_experts``: tokens sorted by expert, three
  ``ragged_dot``), once per ``--xla-variants`` entry (extra ``XLA_FLAGS``: each runs in a child
  process, as XLA reads its flags once), and
* ``impl="dense"`` (every expert on every token: E / top_k = 4x the routed FLOPs), the baseline.

TFLOP/s counts the routed FLOPs only (2 * top_k * 3 * d * f per token forward, 3x that forward +
backward), so a lowering that computes every expert on every token shows as a low figure. The
compiled HLO is searched for what the ragged dots became (a cuDNN fusion, a cuBLAS grouped GEMM, or
nothing of the kind: XLA's dense expansion). Median of ``--reps`` timed calls after two warm-ups.

    PYTHONPATH=. python3 benchmarks/moe.py            # GPU; a table last, JSON to $OUT/moe.json
    python benchmarks/moe.py --small                  # CPU smoke run, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "train", "mamba2-hybrid-moe-2b.yaml")
DEFAULT_VARIANTS = "default"


def _time(fn, args_, reps):
    import jax

    jax.block_until_ready(fn(*args_))
    jax.block_until_ready(fn(*args_))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args_))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def grouped_matmul(args, d, moe_cfg) -> list[dict]:
    """The up projection's grouped matmul alone, (batch * seq * top_k, d) x (E, d, d_ff): each impl of
    ``pallas_kernels.ragged_dot`` (Mosaic GPU with each ``--blocks`` variant), forward and forward +
    backward, and the Mosaic GPU kernels' values and gradients against ``impl="xla"`` (rows past the
    groups included: the groups cover all but 1000 rows)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.ragged_dot import Blocks, mosaic_gpu_applies, ragged_dot

    m, e, f = args.batch * args.seq * moe_cfg.top_k, moe_cfg.n_experts, moe_cfg.d_ff
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((m, f)), jnp.bfloat16)
    sizes = jnp.asarray(rng.multinomial(m - min(1000, m // 8), np.ones(e) / e), jnp.int32)
    flops = 2 * m * d * f
    rows = []
    variants = [("xla", Blocks())] + [("mosaic_gpu", Blocks(*map(int, b.split(":"))))
                                      for b in args.blocks.split(",") if b]
    if mosaic_gpu_applies(x, w):  # a row count the kernels cannot take unpadded, groups short of it
        xo, cto = x[:1001], ct[:1001, :]
        so = jnp.asarray(rng.multinomial(900, np.ones(e) / e), jnp.int32)
        odd = {impl: jax.value_and_grad(lambda x, w, impl=impl: jnp.sum(
            ragged_dot(x, w, so, impl=impl).astype(jnp.float32) * cto), argnums=(0, 1))(xo, w)
            for impl in ("xla", "mosaic_gpu")}
        errs = [float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
                      / np.linalg.norm(np.asarray(b, np.float32)))
                for a, b in zip(jax.tree.leaves(odd["mosaic_gpu"]), jax.tree.leaves(odd["xla"]))]
        rows.append({"impl": "mosaic_gpu", "blocks": "1001 rows, 900 in groups", "check_rel_l2": errs})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    exact = np.asarray(jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes,
                                          precision=jax.lax.Precision.HIGHEST))
    ref = None
    for impl, blocks in variants:
        row = {"impl": impl, "blocks": ":".join(map(str, dataclasses.astuple(blocks))) if impl != "xla" else ""}
        if impl == "mosaic_gpu" and not mosaic_gpu_applies(x, w, blocks):
            row["error"] = "does not apply here"
            rows.append(row)
            continue
        fwd = jax.jit(lambda x, w, impl=impl, blocks=blocks: ragged_dot(x, w, sizes, impl=impl, blocks=blocks))
        grad = jax.jit(jax.value_and_grad(
            lambda x, w, ct, impl=impl, blocks=blocks: jnp.sum(
                ragged_dot(x, w, sizes, impl=impl, blocks=blocks).astype(jnp.float32) * ct), argnums=(0, 1)))
        try:
            y, (_, (dx, dw)) = fwd(x, w), grad(x, w, ct)
            y32 = np.asarray(y, np.float32)
            row["y_rel_l2_vs_f32"] = float(np.linalg.norm(y32 - exact) / np.linalg.norm(exact))
            if ref is None:
                ref = [np.asarray(a, np.float32) for a in (y, dx, dw)]
            else:
                row["rel_l2"] = [float(np.linalg.norm(np.asarray(a, np.float32) - r) / np.linalg.norm(r))
                                 for a, r in zip((y, dx, dw), ref)]
            row["fwd_ms"] = _time(fwd, (x, w), args.reps)
            row["fwd_bwd_ms"] = _time(grad, (x, w, ct), args.reps)
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def child(args) -> dict:
    """Time the layer in this process (XLA_FLAGS already set by the parent)."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jamba_jax.config import MoEConfig
    from jamba_jax.layers.moe import MoE

    model = yaml.safe_load(open(PRESET))["model"]  # not load_config: the GPU image has no grain
    d, moe = model["d_model"], dict(model["moe"])
    if args.small:
        d, moe["d_ff"] = 32, 64
    moe_cfg = MoEConfig(**{k: v for k, v in moe.items() if k in MoEConfig.__dataclass_fields__})
    layer = MoE(moe_cfg, d, impl="ragged", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, args.seq, d)), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((args.batch, args.seq, d)), jnp.bfloat16)
    tokens = args.batch * args.seq
    fwd_flops = 2 * moe_cfg.top_k * 3 * d * moe_cfg.d_ff * tokens

    def forward(params, x, impl):
        return nnx.merge(graphdef, params, rest)(x, impl=impl)[0]

    def loss(params, x, ct, impl):
        return jnp.sum(forward(params, x, impl).astype(jnp.float32) * ct)

    out = {"flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind, "rows": []}
    if args.kernels:
        out["kernels"] = grouped_matmul(args, d, moe_cfg)
    ys = {}
    for impl in args.impls.split(","):
        for mode, fn, args_ in (("fwd", jax.jit(forward, static_argnums=2), (params, x)),
                                ("fwd+bwd", jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3), (params, x, ct))):
            row = {"impl": impl, "mode": mode}
            try:
                compiled = fn.lower(*args_, impl).compile()
                hlo = compiled.as_text()
                row["lowering"] = ",".join(k for k, pat in (("mosaic-gpu", "mosaic_gpu"), ("cudnn", "cudnn"), ("grouped-gemm", "groupedMatmul"),
                                                            ("ragged-dot", "ragged-dot")) if pat in hlo) or "dense"
                if mode == "fwd":
                    ys[impl] = np.asarray(compiled(*args_), np.float32)
                ms = _time(compiled, args_, args.reps)
                row.update(ms=ms, tflops=fwd_flops * (3 if mode == "fwd+bwd" else 1) / ms / 1e9)
            except Exception as e:  # noqa: BLE001 (a lowering that fails is a result)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if "ragged" in ys and "dense" in ys:
        a, b = ys["ragged"], ys["dense"]
        out["ragged_vs_dense_rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--impls", default="ragged,dense")
    p.add_argument("--xla-variants", default=DEFAULT_VARIANTS,
                   help="';'-separated extra XLA_FLAGS, one child process each ('default': none)")
    p.add_argument("--blocks", default="128:128:64:4:1,128:128:64:6:2,128:128:64:6:4,128:128:64:5:2,128:128:128:4:2,128:192:64:4:2",
                   help="Mosaic GPU tile variants of the grouped-matmul rows, each block_m:block_n:block_k:"
                        "max_concurrent_steps:grid_block_n")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the grouped-matmul rows")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.small:
        args.batch, args.seq, args.reps = 2, 64, 2
    if args.child:
        print(json.dumps(child(args)))
        return
    results = []
    for i, variant in enumerate(args.xla_variants.split(";")):
        impls = args.impls if i == 0 else "ragged"  # the dense baseline does not depend on the ragged flags
        env = dict(os.environ)
        if variant != "default":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + variant).strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch), "--seq",
               str(args.seq), "--reps", str(args.reps), "--impls", impls, "--blocks", args.blocks]
        cmd += [] if args.kernels and i == 0 else ["--no-kernels"] + (["--small"] if args.small else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-3000:])
        if proc.returncode != 0 or not proc.stdout.strip():
            results.append({"flags": variant, "rows": [{"impl": impls, "mode": "-", "error": f"exit {proc.returncode}"}]})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["variant"] = variant
        results.append(res)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "moe.json"), "w") as f:
            json.dump(results, f, indent=1)
    kernels = results[0].get("kernels") or []
    if kernels:
        print(f"\nGrouped matmul ({args.batch * args.seq} tokens x top-k rows, d_model x d_ff per expert); "
              "rel. L2 of y, dx, dw against impl=xla")
        print("| impl | blocks | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | y, dx, dw rel. L2 vs xla | y vs float32 |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in kernels:
            if "check_rel_l2" in r:
                print(f"| {r['impl']} | {r['blocks']} | check only | | | | loss, dx, dw: "
                      + " / ".join(f"{v:.1e}" for v in r["check_rel_l2"]) + " | |")
            elif "error" in r:
                print(f"| {r['impl']} | {r['blocks']} | error: {r['error']} | | | | | |")
            else:
                err = " / ".join(f"{v:.1e}" for v in r.get("rel_l2", [])) or "reference"
                print(f"| {r['impl']} | {r['blocks']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} "
                      f"| {r['fwd_bwd_tflops']:.0f} | {err} | {r['y_rel_l2_vs_f32']:.1e} |")
    print(f"\nMoE layer, {args.batch} x {args.seq} tokens ({results[0].get('device', '?')}); TFLOP/s of routed FLOPs")
    print("| XLA flags | impl | mode | lowering | ms | TFLOP/s |\n|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                print(f"| {res.get('variant', res['flags'])} | {r['impl']} | {r['mode']} | error: {r['error']} | | |")
            else:
                print(f"| {res['variant']} | {r['impl']} | {r['mode']} | {r['lowering']} | {r['ms']:.2f} | {r['tflops']:.1f} |")
        if "ragged_vs_dense_rel_l2" in res:
            print(f"ragged vs dense output, relative L2: {res['ragged_vs_dense_rel_l2']:.2e}")


if __name__ == "__main__":
    main()
