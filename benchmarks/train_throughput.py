"""Training throughput: tokens/s and MFU of the full train step (forward, backward, AdamW update).

Models (bf16 compute, float32 master weights, sequences of ``--seq`` tokens, synthetic batches):

* ``hybrid``: ``configs/train/mamba2-hybrid-1b.yaml``, a 1.05B Mamba-2-Hybrid (the first half of the
  Mamba-2-Hybrid 8B layer pattern at d_model 2048: 12 Mamba-2, 2 attention, 14 MLP sublayers);
* ``mamba2``: a pure Mamba-2 of mamba2-1.3b's shape (48 layers, d_model 2048, 64 heads of 64, state
  128, one group, tied embeddings), trained by our step and, when ``mamba_ssm`` is importable (from
  ``.peers``: ``bash ../shared/peers/get_peers.sh``), by mamba_ssm's ``MambaLMHeadModel`` with
  PyTorch AdamW on the same shapes.

Run on the GPU machine from the project root (one H100: about 8 minutes within ``--budget 500``)::

    PYTHONPATH=.:.peers python benchmarks/train_throughput.py                 # both models, seq 4096
    python benchmarks/train_throughput.py --small                             # CPU: tiny shapes, a minute

Phases, in this order, each skipped when the ``--budget`` (seconds, whole script) would not cover it:
mamba_ssm's step in a child process (before JAX takes the GPU; its own ``--torch-timeout``; it
retries at half the batch on out-of-memory), our pure Mamba-2 step, then the hybrid, each over the
configurations of ``--sweep`` (``model:batch/remat[/grad_accum],...;model:...``, batch in sequences
per device): a model's configurations are tried in order until one gives a figure, the rest only
while the budget lasts (leaving a later model its share). A configuration whose compiled step
needs more memory than the device has is skipped before it runs. On GPUs the attention layers use
cuDNN flash attention (``jamba_jax.layers.attention``), with XLA attention as the fallback. Every result goes to
``$OUT/train_throughput.json`` (rewritten after each one) and the log to ``$OUT/train_throughput.log``
as soon as it exists; the last lines printed are a markdown table of every configuration tried and
the verdict on the acceptance figures.

MFU = model FLOPs per step / step time / (devices x peak bf16 FLOP/s of one device). Model FLOPs per
token (training = forward + backward = 3 x forward; one multiply-add = 2 FLOPs):

* matmuls: ``6 * N_mm``, ``N_mm`` the weights of every matrix product a token goes through (all
  projections, MLPs, the routed experts' ``top_k`` share, the LM head; not the embedding lookup);
* attention scores and values: ``12 * seq * n_heads * head_dim`` per attention layer (the full
  ``seq x seq`` square, as PaLM and Megatron count it; a causal kernel skips half of it);
* Mamba-2 SSD, chunk ``Q``, ``H`` heads of dim ``P``, state ``N``, ``G`` groups, per layer:
  ``6 * (G*Q*N + H*Q*P + 2*H*P*N)``: the within-chunk ``C B^T`` (``G Q N``) and its product with ``x``
  (``H Q P``), the chunk states ``B^T x`` and their read-out ``C h`` (``2 H P N``); state passing
  between chunks is negligible;
* depthwise conv: ``6 * d_conv * conv_dim`` per Mamba layer.

Norms, activations, the softmax and the optimizer update are not counted. The peak is the
vendor's dense bf16 figure (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops`` overrides); on the
machine of ../shared/peers/README.md a bf16 matmul reached 785 TFLOP/s, so 79% MFU is the ceiling.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.path.isdir(os.path.join(ROOT, ".peers")):
    sys.path.append(os.path.join(ROOT, ".peers"))

# JAX takes 75% of the GPU's memory at its first use unless told otherwise; nothing here imports
# a module that initialises a backend before main() has run the mamba_ssm child.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import numpy as np  # noqa: E402

HYBRID_PRESET = os.path.join(ROOT, "configs", "train", "mamba2-hybrid-1b.yaml")
MAMBA2_13B = {"vocab_size": 50288, "d_model": 2048, "layers": {"repeat": 48, "period": ["mamba2"]},
              "mamba2": {"n_heads": 64, "head_dim": 64, "d_state": 128, "n_groups": 1, "d_conv": 4,
                         "chunk_size": 256},
              "tie_embeddings": True, "norm_eps": 1e-5}
SMALL_OVERRIDES = {"d_model": 64, "vocab_size": 512}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}
#: The configurations tried, per model, in order: ``batch/remat[/grad_accum_steps]`` (batch in
#: sequences per device). The first is the one that must run; the rest run while the budget lasts.
#: Activation memory at 4096 tokens (estimates): remat=dots keeps the matmul outputs (~0.8 MB per
#: token for the hybrid, ~1.4 MB for the 48-layer Mamba-2), remat=none everything (~1.8 / ~4 MB);
#: the state (float32 weights + AdamW moments + gradients) is 16-21 GB.
DEFAULT_SWEEP = "mamba2:4/dots,2/none;hybrid:8/dots,4/none,8/none/2"
SMALL_SWEEP = "mamba2:2/dots;hybrid:2/dots,2/none/2"
MFU_TARGET, MFU_GOAL = 0.35, 0.45


# ------------------------------------------------------------------------------------- plumbing

class Run:
    """The clock (``--budget``), the log and the incremental JSON of one invocation."""

    def __init__(self, args):
        self.t0 = time.monotonic()
        self.budget = args.budget
        self.out = os.environ.get("OUT") if args.json is None else os.path.dirname(os.path.abspath(args.json))
        self.json_path = args.json
        self.log_path = os.path.join(self.out, "train_throughput.log") if self.out else None
        self.results: list[dict] = []
        self.meta: dict = {"argv": sys.argv[1:], "budget_s": args.budget}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def save(self) -> None:
        if self.json_path:
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": self.meta, "results": self.results}, f, indent=1, default=str)
            os.replace(tmp, self.json_path)


def parse_sweep(text: str) -> dict[str, list[dict]]:
    """``"mamba2:4/dots,2/none;hybrid:8/dots"`` -> ``{"mamba2": [{"batch": 4, "remat": "dots", "accum": 1}, ...]}``."""
    out: dict[str, list[dict]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, configs = part.partition(":")
        items = []
        for c in filter(None, (c.strip() for c in configs.split(","))):
            fields = c.split("/")
            if len(fields) not in (2, 3) or fields[1] not in ("none", "dots", "full"):
                raise SystemExit(f"--sweep: {c!r} is not batch/remat[/grad_accum] (remat: none, dots, full)")
            items.append({"batch": int(fields[0]), "remat": fields[1],
                          "accum": int(fields[2]) if len(fields) > 2 else 1})
        out[name.strip()] = items
    return out


# ------------------------------------------------------------------------------------------- FLOPs

def matmul_params(cfg) -> int:
    """Weights of the matrix products one token goes through (embedding lookup excluded)."""
    from flax import nnx

    from jamba_jax.params import EXPERT_WEIGHTS, _walk, abstract_model

    total = 0
    state = nnx.state(abstract_model(cfg), nnx.Param)
    for name, path, var, r in _walk(state, cfg.period):
        shape = var.shape[1:] if r is not None else var.shape
        leaf = path[-1]
        if len(shape) < 2 or leaf == "conv_weight" or name == "embed.embedding":
            continue
        size = int(np.prod(shape))
        if (leaf in EXPERT_WEIGHTS and path[-2] == "mixer" and r is not None
                and cfg.layers[int(name.split(".")[1])] == "moe"):
            size = size * cfg.moe.top_k // cfg.moe.n_experts
        total += size
    if cfg.tie_embeddings:
        total += cfg.vocab_size * cfg.d_model  # the head reuses the embedding as a matrix product
    return total


def flops_per_token(cfg, seq: int) -> dict[str, float]:
    """Training FLOPs per token by term (see the module docstring)."""
    terms = {"matmul": 6.0 * matmul_params(cfg), "attention": 0.0, "ssd": 0.0, "conv": 0.0}
    for kind in cfg.layers:
        if kind == "attention":
            a = cfg.attention
            terms["attention"] += 12.0 * seq * a.n_heads * a.head_dim
        elif kind == "mamba2":
            m = cfg.mamba2
            q = min(m.chunk_size, seq)
            terms["ssd"] += 6.0 * (m.n_groups * q * m.d_state + m.n_heads * q * m.head_dim
                                   + 2 * m.n_heads * m.head_dim * m.d_state)
            terms["conv"] += 6.0 * m.d_conv * m.conv_dim
        elif kind == "mamba1":
            m = cfg.mamba1
            terms["ssd"] += 6.0 * 3 * m.d_inner * m.d_state  # selective scan: dA*h + dB*x, then C h
            terms["conv"] += 6.0 * m.d_conv * m.d_inner
    return terms


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def model_config(model: dict):
    from jamba_jax.presets import model_config_from_dict

    return model_config_from_dict(model)


# --------------------------------------------------------------------------------------------- JAX

class _Tokenizer:
    eos_id = 0
    vocab_size = 1


def _gib(n) -> float | None:
    return None if n is None else n / 2**30


def jax_step_time(name: str, model: dict, conf: dict, args, run: Run, measure_s: float) -> dict:
    """Compile our train step for one configuration, check it fits, time it on a synthetic batch.

    ``measure_s``: wall seconds the timed repetitions may take (at least one always runs).
    """
    import dataclasses

    import jax

    from jamba_jax.train import sharding as shd
    from jamba_jax.train.config import load_config
    from jamba_jax.train.loop import Trainer

    n = jax.device_count()
    overrides = [f"seq_len={args.seq}", f"batch_size={conf['batch'] * n}", f"remat={conf['remat']}",
                 f"grad_accum_steps={conf['accum']}", f"dtype={args.dtype}", "param_dtype=float32",
                 f"ssm_impl={args.ssm_impl}", f"mesh.{args.mesh_axis}={n}", "steps=1000", "warmup_steps=10",
                 "data.tokenizer=bytes"]
    cfg = load_config(HYBRID_PRESET, overrides)
    cfg = dataclasses.replace(cfg, model=model_config(model), raw={**cfg.raw, "model": model})
    result = {"name": name, "framework": "jax", "batch": conf["batch"], "remat": conf["remat"],
              "grad_accum": conf["accum"], "seq": args.seq, "devices": n,
              "tokens_per_step": cfg.batch_size * cfg.seq_len,
              "params": None, "attention": None, "status": "started"}
    mesh = shd.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh, _Tokenizer())
    result["params"] = trainer.n_params()
    t0 = time.perf_counter()
    compiled = trainer.compile_step()
    result["compile_s"] = time.perf_counter() - t0
    if "attention" in cfg.model.layers:
        text = compiled.as_text() or ""
        result["attention"] = "cudnn" if "fmha" in text.lower() else "xla"
        del text
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        mem = None
    if mem is not None:
        need = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        result.update(planned_gib=_gib(need), temp_gib=_gib(mem.temp_size_in_bytes),
                      arguments_gib=_gib(mem.argument_size_in_bytes), device_limit_gib=_gib(limit))
        run.log(f"  compiled in {result['compile_s']:.0f} s; planned memory {need / 2**30:.1f} GiB (temporaries "
                f"{mem.temp_size_in_bytes / 2**30:.1f}) of {limit / 2**30 if limit else float('nan'):.1f}"
                + (f"; attention: {result['attention']}" if result["attention"] else ""))
        if limit and need > limit:
            result["status"] = f"skipped: needs {need / 2**30:.1f} GiB, the device has {limit / 2**30:.1f}"
            return result
    rng = np.random.default_rng(0)
    b, l = cfg.batch_size, cfg.seq_len
    host = {"input_ids": rng.integers(0, cfg.model.vocab_size, (b, l), dtype=np.int32),
            "targets": rng.integers(0, cfg.model.vocab_size, (b, l), dtype=np.int32),
            "segment_ids": np.ones((b, l), np.int32),
            "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
            "loss_mask": np.ones((b, l), np.float32)}
    batch = shd.replicated_batch(host, trainer.batch_sharding)
    t0 = time.perf_counter()
    state = trainer.init_state()
    jax.block_until_ready(state)
    result["init_s"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            state, metrics = trainer.step(state, batch)
        jax.block_until_ready(state)
        warm = (time.perf_counter() - t0) / max(args.warmup, 1)
        inner = max(1, min(args.inner, int(measure_s / max(args.reps, 1) / max(warm, 1e-6))))
        run.log(f"  state initialised in {result['init_s']:.1f} s; warm-up {warm * 1e3:.0f} ms/step; timing "
                f"{args.reps} x {inner} steps")
        times = []
        deadline = time.perf_counter() + measure_s
        for _ in range(args.reps):
            t = time.perf_counter()
            for _ in range(inner):
                state, metrics = trainer.step(state, batch)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - t) / inner)
            if time.perf_counter() > deadline:
                break
        loss = float(jax.device_get(metrics["loss"]))
        stats = device.memory_stats() or {}
        result.update(status="ok", step_s=statistics.median(times), step_s_all=times, steps_per_rep=inner,
                      warmup_step_s=warm, final_loss=loss,
                      peak_gib_process=_gib(stats.get("peak_bytes_in_use")))
    finally:
        del state, batch, compiled, trainer
        gc.collect()
    return result


# ----------------------------------------------------------------------------------------- PyTorch

def _import_mamba_ssm():
    """mamba_ssm's Mamba-2 path needs only Triton; stub the CUDA extensions its modules import."""
    for missing in ("selective_scan_cuda", "causal_conv1d_cuda"):
        try:
            __import__(missing)
        except ImportError:
            sys.modules[missing] = types.ModuleType(missing)
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaConfig, MambaLMHeadModel


def torch_child(model: dict, args) -> None:
    """mamba_ssm's ``MambaLMHeadModel`` training step (autocast bf16 on float32 weights, fused AdamW,
    clipping); prints a ``RESULT {json}`` line after every timed repetition (the parent keeps the
    last one it sees, so a child stopped by its timeout still reports what it measured)."""
    import torch

    MambaConfig, MambaLMHeadModel = _import_mamba_ssm()
    cfg = model_config(model)
    m = cfg.mamba2
    config = MambaConfig(d_model=cfg.d_model, d_intermediate=0, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size,
                         ssm_cfg={"layer": "Mamba2", "d_state": m.d_state, "d_conv": m.d_conv, "expand": 2,
                                  "headdim": m.head_dim, "ngroups": m.n_groups, "chunk_size": m.chunk_size,
                                  "use_mem_eff_path": False},
                         rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                         tie_embeddings=cfg.tie_embeddings)
    device = torch.device("cuda")
    t_start = time.monotonic()
    net = MambaLMHeadModel(config, device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    n_params = sum(p.numel() for p in net.parameters())
    l = args.seq

    def measure(b: int) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (b, l), device=device, generator=gen)
        targets = torch.randint(0, cfg.vocab_size, (b, l), device=device, generator=gen)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = net(ids).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        for _ in range(args.warmup):
            loss = step()
        torch.cuda.synchronize()
        warm = (time.monotonic() - t0) / max(args.warmup, 1)
        print(f"LOG batch {b}: warm-up {time.monotonic() - t0:.1f} s (the first steps include Triton autotuning)",
              flush=True)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            for _ in range(args.inner):
                loss = step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / args.inner)
            result = {"name": "mamba2", "framework": "mamba_ssm", "batch": b, "remat": "none", "grad_accum": 1,
                      "seq": l, "devices": 1, "status": "ok", "step_s": statistics.median(times),
                      "step_s_all": times, "steps_per_rep": args.inner, "warmup_step_s": warm,
                      "tokens_per_step": b * l, "final_loss": float(loss), "params": n_params,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "child_elapsed_s": time.monotonic() - t_start,
                      "note": "no causal_conv1d CUDA extension: use_mem_eff_path=False, torch Conv1d"}
            print("RESULT " + json.dumps(result), flush=True)

    batches = [int(b) for b in str(args.torch_batches).split(",")]
    for attempt, b in enumerate(batches):
        oom = None
        try:
            measure(b)
            return
        except torch.cuda.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:200]
        print(f"LOG batch {b}: out of memory ({oom})", flush=True)
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    print("LOG out of memory at every batch size tried", flush=True)
    sys.exit(1)


def run_torch_child(args, run: Run) -> dict | None:
    """mamba_ssm's step in a child process that never touches the GPU through JAX (JAX reserves most
    of the GPU's memory in the process that uses it), killed after ``--torch-timeout`` seconds."""
    timeout = min(args.torch_timeout, run.remaining() - args.reserve_jax)
    if timeout < min(60.0, args.torch_timeout):
        run.log(f"mamba_ssm: skipped ({run.remaining():.0f} s left of the budget, "
                f"{args.reserve_jax:.0f} s kept for JAX)")
        return None
    half = max(1, args.batch_torch // 2)
    argv = [sys.executable, os.path.abspath(__file__), "--torch-only", "--seq", str(args.seq),
            "--torch-batches", f"{args.batch_torch},{half}" if half != args.batch_torch else str(half),
            "--warmup", str(args.warmup), "--reps", str(args.reps), "--inner", str(args.inner)]
    log_path = os.path.join(run.out, "mamba_ssm_child.log") if run.out else os.devnull
    run.log(f"mamba_ssm: child process, timeout {timeout:.0f} s, batch {args.batch_torch} (then {half} on OOM)")
    t0 = time.monotonic()
    with open(log_path if run.out else "/tmp/mamba_ssm_child.log", "w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                                  "TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1")})
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)  # the child and any compiler it started
            p.wait()
    with open(log_path if run.out else "/tmp/mamba_ssm_child.log") as f:
        out = f.read()
    result = skip = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.startswith("SKIP "):
            skip = line[5:]
        elif line.startswith("LOG "):
            run.log(f"mamba_ssm: {line[4:]}")
    took = time.monotonic() - t0
    if skip:
        run.log(f"mamba_ssm: no comparison: {skip}")
        return None
    if result is None:
        why = f"timed out after {took:.0f} s" if timed_out else f"exit {p.returncode}"
        run.log(f"mamba_ssm: no result ({why}); its output ends:\n{out[-3000:]}")
        run.results.append({"name": "mamba2", "framework": "mamba_ssm", "status": f"failed: {why}",
                            "batch": args.batch_torch})
        run.save()
        return None
    result["child_s"] = took
    if timed_out:
        result["status"] = f"ok (stopped by the {timeout:.0f} s timeout after {len(result['step_s_all'])} repetitions)"
    return result


# -------------------------------------------------------------------------------------------- main

def finish(result: dict, cfg, args, peak: float | None) -> dict:
    terms = flops_per_token(cfg, args.seq)
    per_token = sum(terms.values())
    result["flops_per_token"] = terms
    if result.get("step_s"):
        tokens_per_s = result["tokens_per_step"] / result["step_s"]
        mfu = tokens_per_s * per_token / (peak * result["devices"]) if peak else None
        result.update(tokens_per_s=tokens_per_s, model_tflops_per_s=tokens_per_s * per_token / 1e12, mfu=mfu)
    return result


def describe(r: dict) -> str:
    conf = (f"{r['name']:<7} {r['framework']:<9} b={r.get('batch')} remat={r.get('remat')} "
            f"accum={r.get('grad_accum', 1)}")
    if not r.get("step_s"):
        return f"{conf}: {r.get('status')}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mem = r.get("planned_gib") or r.get("peak_gib")
    return (f"{conf}: {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['model_tflops_per_s']:.1f} TFLOP/s, MFU {mfu}, memory {mem if mem is None else f'{mem:.2f} GiB'}"
            + (f", attention {r['attention']}" if r.get("attention") else "")
            + (f", compile {r['compile_s']:.0f} s" if r.get("compile_s") else ""))


def table(results: list[dict]) -> str:
    rows = ["| model | framework | seqs/step (accum) | remat | ms/step | tokens/s | TFLOP/s | MFU | memory GiB | "
            "compile s | attention | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = bool(r.get("step_s"))
        mem = r.get("planned_gib") or r.get("peak_gib")
        rows.append("| " + " | ".join([
            r["name"], r["framework"], f"{r.get('batch')} ({r.get('grad_accum', 1)})", str(r.get("remat")),
            f"{r['step_s'] * 1e3:.1f}" if ok else "", f"{r['tokens_per_s']:,.0f}" if ok else "",
            f"{r['model_tflops_per_s']:.1f}" if ok else "",
            f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "",
            f"{mem:.2f}" if mem else "", f"{r['compile_s']:.0f}" if r.get("compile_s") else "",
            r.get("attention") or "", str(r.get("status", ""))[:80].replace("|", "/")]) + " |")
    return "\n".join(rows)


def verdict(results: list[dict]) -> list[str]:
    def best(name, framework, key):
        ok = [r for r in results if r["name"] == name and r["framework"] == framework and r.get(key) is not None]
        return max(ok, key=lambda r: r[key]) if ok else None

    lines = []
    h = best("hybrid", "jax", "mfu")
    if h:
        mark = "goal met" if h["mfu"] >= MFU_GOAL else "target met" if h["mfu"] >= MFU_TARGET else "BELOW target"
        lines.append(f"hybrid MFU (best, b={h['batch']} remat={h['remat']} accum={h['grad_accum']}): "
                     f"{100 * h['mfu']:.1f}% (target {100 * MFU_TARGET:.0f}%, goal {100 * MFU_GOAL:.0f}%): {mark}")
    ours, theirs = best("mamba2", "jax", "tokens_per_s"), best("mamba2", "mamba_ssm", "tokens_per_s")
    if ours and theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        lines.append(f"pure Mamba-2 tokens/s, ours (b={ours['batch']} remat={ours['remat']}) / mamba_ssm "
                     f"(b={theirs['batch']}): {ours['tokens_per_s']:,.0f} / {theirs['tokens_per_s']:,.0f} = "
                     f"{ratio:.2f}x: {'met' if ratio >= 1.0 else 'NOT met'}")
    elif ours:
        lines.append("pure Mamba-2: no mamba_ssm figure in this run")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny widths and sequences (CPU check)")
    parser.add_argument("--models", default="mamba2,hybrid", help="comma list of: mamba2, hybrid (run in this order)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--sweep", default=None, help=f"configurations per model (default: {DEFAULT_SWEEP!r})")
    parser.add_argument("--batch-torch", type=int, default=4, help="mamba_ssm's sequences per step (halved on OOM)")
    parser.add_argument("--budget", type=float, default=500.0,
                        help="seconds for the whole script; later phases are skipped when over (default %(default)s)")
    parser.add_argument("--torch-timeout", type=float, default=210.0, help="seconds for the mamba_ssm child")
    parser.add_argument("--reserve-jax", type=float, default=230.0,
                        help="seconds of the budget the mamba_ssm child leaves for the JAX phases")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--ssm-impl", default="auto")
    parser.add_argument("--mesh-axis", default="fsdp", choices=["data", "fsdp"],
                        help="the mesh axis spanning the devices (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of one device")
    parser.add_argument("--no-torch", action="store_true", help="skip mamba_ssm even when importable")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-batches", default="4", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=os.path.join(os.environ["OUT"], "train_throughput.json")
                        if os.environ.get("OUT") else None, help="also write the results here")
    args = parser.parse_args(argv)

    import yaml

    with open(HYBRID_PRESET) as f:
        hybrid = yaml.safe_load(f)["model"]
    mamba2 = json.loads(json.dumps(MAMBA2_13B))
    if args.torch_only:
        try:
            import torch

            if not torch.cuda.is_available():
                raise ImportError("no CUDA device for PyTorch")
            _import_mamba_ssm()
        except ImportError as e:
            print(f"SKIP {e} (put .peers on PYTHONPATH: bash ../shared/peers/get_peers.sh)", flush=True)
            return
        torch_child(mamba2, args)
        return

    if args.small:
        args.seq, args.warmup, args.reps, args.inner = min(args.seq, 128), 1, 2, 2
        for m in (hybrid, mamba2):
            m.update(SMALL_OVERRIDES)
            m["mamba2"] = {**m["mamba2"], "n_heads": 4, "head_dim": 16, "d_state": 16, "n_groups": 1, "chunk_size": 32}
        hybrid["attention"] = {**hybrid["attention"], "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
        hybrid["mlp"] = {**hybrid["mlp"], "d_ff": 128}
        hybrid["layers"] = "M-M*-"
        mamba2["layers"] = {"repeat": 4, "period": ["mamba2"]}
    sweep = parse_sweep(args.sweep or (SMALL_SWEEP if args.small else DEFAULT_SWEEP))
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name not in ("mamba2", "hybrid"):
            raise SystemExit(f"--models: unknown model {name!r}")
        if not sweep.get(name):
            raise SystemExit(f"--sweep: no configuration for {name!r}")
    run = Run(args)
    if run.out:
        os.makedirs(run.out, exist_ok=True)
    run.meta.update(seq=args.seq, dtype=args.dtype, sweep=sweep, small=args.small)
    models = {"hybrid": hybrid, "mamba2": mamba2}

    # 1. mamba_ssm first: before this process's JAX takes the GPU
    torch_result = None
    if not (args.small or args.no_torch or "mamba2" not in names):
        torch_result = run_torch_child(args, run)

    # 2. JAX (a persistent compilation cache, so that a second run on the same machine skips compiling)
    if not args.small:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/jamba_jax_compile_cache")
    import logging

    import jax

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from jamba_jax.layers import attention

    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, args.peak_tflops)
    run.meta.update(device=device.device_kind, devices=jax.device_count(), jax=jax.__version__,
                    peak_tflops=peak / 1e12 if peak else None,
                    mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                    xla_flags=os.environ.get("XLA_FLAGS"))
    run.log(f"{jax.device_count()} x {device.device_kind}, JAX {jax.__version__}; seq {args.seq}, {args.dtype} "
            f"compute on float32 weights; peak {peak / 1e12 if peak else 'unknown'} TFLOP/s per device")
    if torch_result is not None:
        run.results.append(finish(torch_result, model_config(mamba2), args, peak))
        run.log(describe(run.results[-1]))
        run.save()

    cost: dict[str, float] = {}  # seconds the last configuration of a model took, compile included
    for i, name in enumerate(names):
        later = names[i + 1:]
        for conf in sweep[name]:
            # once a model has a figure, its other configurations leave a later model its share of the budget
            keep = sum(cost.get(n, 0.65 * args.reserve_jax) for n in later) if later else 0.0
            expect = cost.get(name, 90.0)
            left = run.remaining()
            measured = any(r["name"] == name and r["framework"] == "jax" and r.get("step_s") for r in run.results)
            if measured and left - keep < 1.15 * expect + 10:
                run.log(f"{name} b={conf['batch']} remat={conf['remat']} accum={conf['accum']}: skipped "
                        f"({left:.0f} s left, ~{expect:.0f} s needed, {keep:.0f} s kept for {later})")
                run.results.append({"name": name, "framework": "jax", **{k: conf[k] for k in ("batch", "remat")},
                                    "grad_accum": conf["accum"], "status": "skipped: budget"})
                run.save()
                continue
            if not measured and (left < 30 or (later and left - keep < 60)):
                run.log(f"{name}: skipped, {left:.0f} s left of the budget ({keep:.0f} s kept for {later})")
                run.results.append({"name": name, "framework": "jax", "batch": conf["batch"], "remat": conf["remat"],
                                    "grad_accum": conf["accum"], "status": "skipped: budget"})
                run.save()
                continue
            run.log(f"{name} b={conf['batch']} remat={conf['remat']} accum={conf['accum']}: compiling")
            t0 = time.monotonic()
            measure_s = max(3.0, min(20.0, (left - keep) * 0.15))
            result = None
            for attempt in range(2):
                try:
                    result = jax_step_time(name, models[name], conf, args, run, measure_s)
                    break
                except Exception as e:  # noqa: BLE001 (record it, go on with the next configuration)
                    msg = f"{type(e).__name__}: {e}"
                    run.log(f"{name}: failed: {msg[:1500]}")
                    result = {"name": name, "framework": "jax", "batch": conf["batch"], "remat": conf["remat"],
                              "grad_accum": conf["accum"], "status": f"failed: {msg[:300]}"}
                    oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
                    took = time.monotonic() - t0
                    if (attempt == 0 and not oom and attention.GPU_AUTO_IMPL == "cudnn"
                            and "attention" in model_config(models[name]).layers and jax.default_backend() == "gpu"
                            and run.remaining() > 1.2 * took + 20):
                        run.log("retrying with XLA attention instead of cuDNN")
                        attention.GPU_AUTO_IMPL = "xla"
                        continue
                    break
                finally:
                    gc.collect()
            cost[name] = time.monotonic() - t0
            run.results.append(finish(result, model_config(models[name]), args, peak))
            run.log(describe(run.results[-1]) + f" [{cost[name]:.0f} s]")
            run.save()

    print("\n" + table(run.results), flush=True)
    lines = verdict(run.results)
    run.meta["verdict"] = lines
    run.save()
    for line in lines:
        run.log(line)
    run.log(f"done in {run.elapsed():.0f} s")


if __name__ == "__main__":
    main()
