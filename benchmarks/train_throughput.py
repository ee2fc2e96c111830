"""Training throughput: tokens/s and MFU of the full train step (forward, backward, AdamW update).

Models (bf16 compute, float32 master weights, sequences of ``--seq`` tokens, synthetic batches):

* ``hybrid``: ``configs/train/mamba2-hybrid-1b.yaml``, a 1.05B Mamba-2-Hybrid (the first half of the
  Mamba-2-Hybrid 8B layer pattern at d_model 2048: 12 Mamba-2, 2 attention, 14 MLP sublayers);
* ``mamba2``: a pure Mamba-2 of mamba2-1.3b's shape (48 layers, d_model 2048, 64 heads of 64, state
  128, one group, tied embeddings), trained by our step and, when ``mamba_ssm`` is importable (from
  ``.peers``: ``bash ../shared/peers/get_peers.sh``), by mamba_ssm's ``MambaLMHeadModel`` with
  PyTorch AdamW on the same shapes.

Run on the GPU machine from the project root::

    PYTHONPATH=.:.peers python benchmarks/train_throughput.py                 # both models, seq 4096
    python benchmarks/train_throughput.py --small                             # CPU: tiny shapes, seconds

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
import json
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.path.isdir(os.path.join(ROOT, ".peers")):
    sys.path.append(os.path.join(ROOT, ".peers"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jamba_jax.config import ModelConfig  # noqa: E402
from jamba_jax.params import count_params  # noqa: E402

HYBRID_PRESET = os.path.join(ROOT, "configs", "train", "mamba2-hybrid-1b.yaml")
MAMBA2_13B = {"vocab_size": 50288, "d_model": 2048, "layers": {"repeat": 48, "period": ["mamba2"]},
              "mamba2": {"n_heads": 64, "head_dim": 64, "d_state": 128, "n_groups": 1, "d_conv": 4,
                         "chunk_size": 256},
              "tie_embeddings": True, "norm_eps": 1e-5}
SMALL_OVERRIDES = {"d_model": 64, "vocab_size": 512}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


# ------------------------------------------------------------------------------------------- FLOPs

def matmul_params(cfg: ModelConfig) -> int:
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
        if leaf in EXPERT_WEIGHTS and path[-2] == "mixer" and r is not None and cfg.layers[int(name.split(".")[1])] == "moe":
            size = size * cfg.moe.top_k // cfg.moe.n_experts
        total += size
    if cfg.tie_embeddings:
        total += cfg.vocab_size * cfg.d_model  # the head reuses the embedding as a matrix product
    return total


def flops_per_token(cfg: ModelConfig, seq: int) -> dict[str, float]:
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


def peak_flops(device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


# --------------------------------------------------------------------------------------------- JAX

class _Tokenizer:
    eos_id = 0
    vocab_size = 1


def jax_step_time(name: str, model: dict, args) -> dict:
    """Median seconds per train step of our trainer on synthetic batches, and the step's memory."""
    from jamba_jax.train import sharding as shd
    from jamba_jax.train.config import load_config
    from jamba_jax.train.loop import Trainer

    n = jax.device_count()
    overrides = [f"seq_len={args.seq}", f"batch_size={args.batch * n}", f"remat={args.remat}",
                 f"dtype={args.dtype}", "param_dtype=float32", f"ssm_impl={args.ssm_impl}",
                 f"mesh.{args.mesh_axis}={n}", "steps=1000", "warmup_steps=10", "data.tokenizer=bytes"]
    cfg = load_config(HYBRID_PRESET, overrides)
    cfg = _replace_model(cfg, model)
    mesh = shd.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh, _Tokenizer())
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
    compiled = trainer.compile_step()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(args.warmup):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(args.inner):
            state, metrics = trainer.step(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) / args.inner)
    loss = float(jax.device_get(metrics["loss"]))
    return {"name": name, "framework": "jax", "step_s": statistics.median(times), "tokens_per_step": b * l,
            "compile_and_init_s": compile_s, "final_loss": loss, "params": count_params(cfg.model),
            "temp_gib_per_device": None if mem is None else mem.temp_size_in_bytes / 2**30,
            "cfg": cfg.model, "devices": n}


def _replace_model(cfg, model: dict):
    import dataclasses

    from jamba_jax.presets import model_config_from_dict

    model_cfg = model_config_from_dict(model)
    return dataclasses.replace(cfg, model=model_cfg, raw={**cfg.raw, "model": model})


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


def torch_step_time(model: dict, args) -> dict:
    import torch

    MambaConfig, MambaLMHeadModel = _import_mamba_ssm()
    cfg = ModelConfig.from_dict({**model, "layers": ("mamba2",) * model["layers"]["repeat"]})
    m = cfg.mamba2
    config = MambaConfig(d_model=cfg.d_model, d_intermediate=0, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size,
                         ssm_cfg={"layer": "Mamba2", "d_state": m.d_state, "d_conv": m.d_conv, "expand": 2,
                                  "headdim": m.head_dim, "ngroups": m.n_groups, "chunk_size": m.chunk_size,
                                  "use_mem_eff_path": False},
                         rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                         tie_embeddings=cfg.tie_embeddings)
    device = torch.device("cuda")
    net = MambaLMHeadModel(config, device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    b, l = args.batch, args.seq
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
        return loss

    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(args.inner):
            loss = step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / args.inner)
    return {"name": "mamba2", "framework": "mamba_ssm", "step_s": statistics.median(times), "tokens_per_step": b * l,
            "final_loss": float(loss), "params": sum(p.numel() for p in net.parameters()),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "cfg": cfg, "devices": 1}


# -------------------------------------------------------------------------------------------- main

def report(result: dict, args, peak: float | None) -> dict:
    cfg = result.pop("cfg")
    terms = flops_per_token(cfg, args.seq)
    per_token = sum(terms.values())
    tokens_per_s = result["tokens_per_step"] / result["step_s"]
    mfu = tokens_per_s * per_token / (peak * result["devices"]) if peak else None
    result.update(tokens_per_s=tokens_per_s, model_tflops_per_s=tokens_per_s * per_token / 1e12,
                  flops_per_token={k: v for k, v in terms.items()}, mfu=mfu)
    mfu_text = f"{100 * mfu:5.1f}%" if mfu is not None else "  n/a"
    print(f"{result['name']:<8} {result['framework']:<10} {result['params'] / 1e6:8.1f}M  "
          f"{result['step_s'] * 1e3:9.1f} ms/step  {tokens_per_s:12,.0f} tok/s  "
          f"{result['model_tflops_per_s']:7.1f} TFLOP/s  MFU {mfu_text}", flush=True)
    return result


def _torch_in_child(args) -> dict | None:
    """mamba_ssm's step in a child process that never touches the GPU through JAX (JAX reserves most
    of the GPU's memory in the process that uses it)."""
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--torch-only", "--seq", str(args.seq), "--batch",
            str(args.batch), "--warmup", str(args.warmup), "--reps", str(args.reps), "--inner", str(args.inner)]
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if line.startswith("SKIP "):
            print(f"no mamba_ssm comparison: {line[5:]}")
            return None
    print(f"mamba_ssm step failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny widths and sequences (CPU check)")
    parser.add_argument("--models", default="hybrid,mamba2", help="comma list of: hybrid, mamba2")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="sequences per device")
    parser.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--ssm-impl", default="auto")
    parser.add_argument("--mesh-axis", default="fsdp", choices=["data", "fsdp"],
                        help="the mesh axis spanning the devices (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--inner", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of one device")
    parser.add_argument("--no-torch", action="store_true", help="skip mamba_ssm even when importable")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=os.path.join(os.environ["OUT"], "train_throughput.json")
                        if os.environ.get("OUT") else None, help="also write the results here")
    args = parser.parse_args(argv)

    import yaml

    hybrid = yaml.safe_load(open(HYBRID_PRESET))["model"]
    mamba2 = dict(MAMBA2_13B)
    if args.torch_only:
        try:
            import torch

            if not torch.cuda.is_available():
                raise ImportError("no CUDA device for PyTorch")
            _import_mamba_ssm()
        except ImportError as e:
            print(f"SKIP {e} (put .peers on PYTHONPATH: bash ../shared/peers/get_peers.sh)")
            return
        result = torch_step_time(mamba2, args)
        result.pop("cfg")
        print("RESULT " + json.dumps(result))
        return
    if args.small:
        args.seq, args.batch, args.warmup, args.reps, args.inner = min(args.seq, 128), min(args.batch, 2), 1, 2, 2
        for m in (hybrid, mamba2):
            m.update(SMALL_OVERRIDES)
            m["mamba2"] = {**m["mamba2"], "n_heads": 4, "head_dim": 16, "d_state": 16, "n_groups": 1, "chunk_size": 32}
        hybrid["attention"] = {**hybrid["attention"], "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
        hybrid["mlp"] = {**hybrid["mlp"], "d_ff": 128}
        hybrid["layers"] = "M-M*-"
        mamba2["layers"] = {"repeat": 4, "period": ["mamba2"]}
    names = args.models.split(",")
    # mamba_ssm first: before this process's JAX takes the GPU
    torch_result = None if args.small or args.no_torch or "mamba2" not in names else _torch_in_child(args)
    device = jax.devices()[0]
    peak = peak_flops(device, args.peak_tflops)
    print(f"{jax.device_count()} x {device.device_kind}; seq {args.seq}, {args.batch} sequences per device, "
          f"{args.dtype} compute, remat={args.remat}; peak {peak / 1e12 if peak else 'unknown'} TFLOP/s per device",
          flush=True)
    results = []
    models = {"hybrid": hybrid, "mamba2": mamba2}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)

    for name in names:
        results.append(report(jax_step_time(name, models[name], args), args, peak))
        save()
        if name == "mamba2" and torch_result is not None:
            torch_result["cfg"] = ModelConfig.from_dict({**mamba2, "layers": ("mamba2",) * mamba2["layers"]["repeat"]})
            results.append(report(torch_result, args, peak))
            save()


if __name__ == "__main__":
    main()
