"""Multi-GPU scaling of training: ``train.py`` on one GPU, then on all of one host's GPUs through
each mesh layout, the same global batch every time.

Model: ``configs/train/mamba2-hybrid-moe-2b.yaml`` (2.2B parameters, 1.1B active: the hybrid 1B's
Mamba-2 / attention / MLP pattern with every other feed-forward sublayer a top-2 mixture of 8
experts), 4096-token rows, bf16 compute on float32 master weights, remat=dots. Data: ``train.py``'s
default corpus (the Python standard library's source as bytes), read through grain as in any run.

Runs, each a ``train.py`` process of its own (``--steps`` steps, a line of metrics every step, no
evaluation, no sample, ``checkpoints=false``), in this order:

1. the baseline: one GPU (``CUDA_VISIBLE_DEVICES`` = the first), global batch ``--per-gpu-batch``
   x N rows in N microbatches (``grad_accum_steps`` = N), so that each microbatch is one GPU's share;
2. each layout of ``--layouts`` over all N GPUs (default: ``data``, ``fsdp``, ``tensor`` and
   ``expert`` each at N), the same global batch in one step (a GPU holds ``per-gpu-batch`` rows,
   or all of them at 1/N of the width under ``tensor``).

Every run starts from the same initialisation and reads the same batches, so its losses must equal
the baseline's: the table gives the largest relative difference over the first ``--compare-steps``
steps and over all of them. Tokens/s is ``train.py``'s own figure (``tokens_per_sec`` in ``metrics.jsonl``: tokens between
two log lines over the wall time between them), the median of the steps after ``--warmup`` steps;
per GPU it is divided by the run's GPUs, and "scaling" is that over the baseline's. MFU uses the
model FLOPs of ``benchmarks/train_throughput.py`` and the device's dense bf16 peak.

A run is skipped when the time so far plus an estimate of it (the longest run so far, x1.2; 240 s
before any) would pass ``--budget``. NCCL's NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``; the
device machines set it, and every child inherits it). Output: ``$OUT/multi_gpu.json`` (rewritten
after each run), each run's ``train.py`` log under ``$OUT/logs/``, a markdown table printed last::

    PYTHONPATH=.:/tmp/site python3 benchmarks/multi_gpu.py          # GPU host: all its GPUs
    python benchmarks/multi_gpu.py --small                          # CPU: smoke model, 2 simulated devices
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
# This process only counts FLOPs (abstract shapes): it must not take GPU memory from its children.
os.environ["JAX_PLATFORMS"] = "cpu"
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
CHILD_ENV.setdefault("NCCL_NVLS_ENABLE", "0")
CHILD_ENV["PYTHONUNBUFFERED"] = "1"

from train_throughput import flops_per_token, peak_flops  # noqa: E402

from jamba_jax.train.config import load_config  # noqa: E402

PRESET = ROOT / "configs" / "train" / "mamba2-hybrid-moe-2b.yaml"
SMOKE = ROOT / "configs" / "train" / "smoke.yaml"
MESH_AXES = ("data", "fsdp", "tensor", "expert")
#: Every run: a metrics line per step, nothing but training.
COMMON = ["log_every=1", "eval_batches=0", "eval_every=0", "sample_tokens=0", "progress=false",
          "tensorboard=false", "checkpoints=false"]


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n = len([line for line in out.splitlines() if line.strip()])
    return min(n, len(visible.split(","))) if visible else n


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "cpu"


def parse_layout(text: str, n: int) -> dict[str, int]:
    """``"fsdp"`` -> ``{"fsdp": n}``; ``"fsdp=2,expert=4"`` -> as written (the product must be ``n``)."""
    mesh = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis not in MESH_AXES:
            raise SystemExit(f"--layouts: unknown mesh axis {axis!r} in {text!r} (one of {', '.join(MESH_AXES)})")
        mesh[axis] = int(size) if size else n
    product = 1
    for size in mesh.values():
        product *= size
    if product != n:
        raise SystemExit(f"--layouts: {text!r} covers {product} devices, not {n}")
    return mesh


def layout_name(mesh: dict[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in mesh.items()) or "1 device"


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0, self.longest = seconds, time.monotonic(), 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def allows(self) -> bool:
        estimate = 1.2 * self.longest if self.longest else 240.0
        return self.elapsed() + estimate <= self.seconds


def train_run(name: str, overrides: list[str], env: dict, args, out: Path | None, budget: Budget) -> dict:
    """One ``train.py`` process; its per-step losses and tokens/s from ``metrics.jsonl``."""
    result = {"name": name, "overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="multi_gpu_") as workdir:
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(args.config), "--workdir", workdir,
               *COMMON, *overrides]
        t0 = time.monotonic()
        timeout = max(30.0, args.budget - budget.elapsed())
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
            log, status = p.stdout + p.stderr, f"exit {p.returncode}"
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode() + (e.stderr or b"").decode() if isinstance(e.stdout, bytes) else \
                (e.stdout or "") + (e.stderr or "")
            status = f"timed out after {timeout:.0f} s"
        result["wall_s"] = time.monotonic() - t0
        budget.longest = max(budget.longest, result["wall_s"])
        if out is not None:
            (out / "logs").mkdir(parents=True, exist_ok=True)
            (out / "logs" / f"{name.replace(' ', '_').replace('=', '')}.log").write_text(log)
        for line in log.splitlines():
            if "compiled in" in line:
                result["compile_s"] = float(line.split("compiled in")[1].split()[0])
            if "memory per device" in line:
                result["memory"] = line.split("memory per device:")[1].strip()
        metrics = Path(workdir) / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = {r["step"]: r for r in rows if "loss" in r}
    result["losses"] = {s: steps[s]["loss"] for s in sorted(steps)}
    rates = [steps[s]["tokens_per_sec"] for s in sorted(steps) if s > args.warmup and "tokens_per_sec" in steps[s]]
    if status != "exit 0" or not rates:
        errors = [line for line in log.splitlines() if "Error" in line or "error:" in line]
        result["error"] = status + ("" if rates else "; no timed steps") + "\n" + "\n".join(
            errors[-4:] or log.splitlines()[-15:])
    if rates:
        result["tokens_per_s"] = statistics.median(rates)
    return result


def compare(result: dict, baseline: dict, steps: int | None = None) -> float | None:
    """Largest relative difference of ``result``'s losses from ``baseline``'s over steps 1..``steps``
    (all steps both logged when None)."""
    common = [s for s in baseline.get("losses", {}) if s in result.get("losses", {}) and (steps is None or s <= steps)]
    if not common:
        return None
    return max(abs(result["losses"][s] - baseline["losses"][s]) / abs(baseline["losses"][s]) for s in common)


def table(results: list[dict], baseline: dict | None, flops_per_tok: float, peak: float | None, args) -> str:
    lines = ["| layout | GPUs | global batch (accum) | step ms | tokens/s | tokens/s per GPU | scaling | MFU "
             f"| max loss rel. diff vs 1 GPU, steps 1-{args.compare_steps} / 1-{args.steps} | compile s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    base_per_gpu = baseline["tokens_per_s"] / baseline["gpus"] if baseline and "tokens_per_s" in baseline else None
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['name']} | {r['gpus']} | {r['batch']} ({r['accum']}) | - | - | - | - | - | - | "
                         f"{r.get('error', 'skipped').splitlines()[0]} |")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        step_ms = 1e3 * r["batch"] * args.seq_len / r["tokens_per_s"]
        mfu = f"{100 * per_gpu * flops_per_tok / peak:.1f}%" if peak else "-"
        scaling = f"{per_gpu / base_per_gpu:.3f}" if base_per_gpu else "-"
        diffs = [compare(r, baseline, n) if baseline and r is not baseline else None for n in (args.compare_steps, None)]
        diff_text = "(reference)" if r is baseline else " / ".join(f"{d:.1e}" if d is not None else "-" for d in diffs)
        lines.append(f"| {r['name']} | {r['gpus']} | {r['batch']} ({r['accum']}) | {step_ms:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {scaling} | {mfu} | {diff_text} | "
                     f"{r.get('compile_s', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"training config (default: {PRESET.relative_to(ROOT)}, or with --small {SMOKE.relative_to(ROOT)})")
    parser.add_argument("--layouts", default="data;fsdp;tensor;expert",
                        help="';'-separated mesh layouts over all GPUs: an axis name (that axis = N) or "
                             "'axis=size,...' (product N)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--per-gpu-batch", type=int, default=4, help="rows of --seq-len per GPU per microbatch")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the tokens/s median")
    parser.add_argument("--compare-steps", type=int, default=5,
                        help="the first steps, whose losses must match the baseline's (all steps are compared too)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--small", action="store_true",
                        help="CPU check of the plumbing: the smoke config, 2 simulated devices, 64-token rows")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)

    env = dict(CHILD_ENV)
    if args.small:
        args.config, args.seq_len = args.config or SMOKE, 64
        n, device = args.gpus or 2, "cpu"
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    else:
        args.config = args.config or PRESET
        n, device = args.gpus or gpu_count(), gpu_name()
        if n < 2:
            raise SystemExit(f"multi_gpu.py needs at least 2 GPUs, found {n} (use --small for a CPU check)")
    cfg = load_config(str(args.config), [f"seq_len={args.seq_len}"])
    flops_per_tok = sum(flops_per_token(cfg.model, args.seq_len).values())
    peak = None if args.small else peak_flops(device, args.peak_tflops)
    global_batch = args.per_gpu_batch * n
    # The preset's peak learning rate after 2 warm-up steps, so that the losses move within the run.
    shared = [f"seq_len={args.seq_len}", f"batch_size={global_batch}", f"steps={args.steps}", "warmup_steps=2",
              f"schedule_steps={args.steps}"]
    budget = Budget(args.budget)
    print(f"[{budget.elapsed():6.1f}s] {n} x {device}; {args.config.name}: {flops_per_tok / 1e9:.2f} GFLOP/token; "
          f"global batch {global_batch} x {args.seq_len}, {args.steps} steps per run, budget {args.budget:.0f} s",
          flush=True)

    plans = [dict(name="1 GPU", gpus=1, mesh={}, accum=n)]
    plans += [dict(name=layout_name(m), gpus=n, mesh=m, accum=1)
              for m in (parse_layout(t.strip(), n) for t in args.layouts.split(";") if t.strip())]
    results, baseline = [], None
    for plan in plans:
        record = dict(name=plan["name"], gpus=plan["gpus"], batch=global_batch, accum=plan["accum"])
        if not budget.allows():
            record["error"] = "skipped (budget)"
            results.append(record)
            continue
        run_env = dict(env)
        if args.small:
            run_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={plan['gpus']}"
        elif plan["gpus"] == 1:
            run_env["CUDA_VISIBLE_DEVICES"] = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        overrides = shared + [f"grad_accum_steps={plan['accum']}"] + [f"mesh.{a}={s}" for a, s in plan["mesh"].items()]
        record.update(train_run(plan["name"], overrides, run_env, args, args.out, budget))
        if plan["gpus"] == 1:
            baseline = record
        results.append(record)
        rate = f"{record['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in record else record.get("error", "")
        diff = compare(record, baseline, args.compare_steps) if baseline and record is not baseline else None
        print(f"[{budget.elapsed():6.1f}s] {plan['name']}: {rate.splitlines()[0] if rate else ''}; "
              f"losses {[round(v, 4) for v in record.get('losses', {}).values()][:args.compare_steps]}"
              + (f"; max rel. diff vs 1 GPU {diff:.2e}" if diff is not None else "")
              + f"; {record['wall_s']:.0f} s", flush=True)
        if "error" in record:
            print(record["error"], flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "multi_gpu.json").write_text(json.dumps(
                dict(device=device, gpus=n, config=str(args.config), flops_per_token=flops_per_tok,
                     results=results), indent=1))
    print()
    print(table(results, baseline, flops_per_tok, peak, args))


if __name__ == "__main__":
    main()
