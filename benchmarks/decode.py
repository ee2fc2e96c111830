"""Prefill and decode throughput of cached generation, with the HBM bandwidth each decode step reaches.

Models (random weights, bfloat16 weights and activations, float32 SSM state):

* ``mamba2-2.7b``: the Mamba-2 2.7B shape (``configs/models/mamba2-2.7b.yaml``);
* ``mamba2-hybrid-8b``: the Mamba-2-Hybrid 8B shape (24 Mamba-2, 4 attention, 28 MLP sublayers).

For each model and batch size: prefill tokens/s (``batch * prompt_len`` over the compiled prefill
call, first token included) and decode tokens/s (``batch * (gen_len - 1)`` over one compiled
``while_loop`` call that decodes the rest). The HBM fraction of a decode step is the bytes it must
move (every weight matrix read once, the embedding table only if it is also the head, MoE experts
scaled by how many a step can touch; SSM and conv state read and written; the whole preallocated KV
cache read, as the implementation does) over the step time and ``--peak-bw`` (3.35e12 B/s: H100 SXM).

When mamba_ssm is importable from ``.peers`` (``../shared/peers/get_peers.sh``) and CUDA is there,
the Mamba-2 model is also run through mamba_ssm's ``MambaLMHeadModel.generate(..., cg=True)`` (CUDA
graph decode, Triton ``selective_state_update``, bfloat16 state; its CUDA extensions are stubbed, so
the conv runs its PyTorch fallback) with the same config, prompt and lengths, in the same process.

    python benchmarks/decode.py                 # GPU: both models, batch 1 and 64
    python benchmarks/decode.py --small         # CPU smoke run: tiny models of the same layouts
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jamba_jax.cache import cache_bytes  # noqa: E402
from jamba_jax.config import AttentionConfig, Mamba2Config, MLPConfig, ModelConfig, layers_from_pattern  # noqa: E402
from jamba_jax.generate import TokenStream  # noqa: E402
from jamba_jax.model import LanguageModel  # noqa: E402
from jamba_jax.presets import load_preset  # noqa: E402

MODELS = ("mamba2-2.7b", "mamba2-hybrid-8b")


# ------------------------------------------------------------------------------------ models

def small_config(name: str) -> ModelConfig:
    """A tiny model of the same layout, for a CPU smoke run."""
    m2 = Mamba2Config(n_heads=4, head_dim=16, d_state=16, n_groups=1, d_conv=4, chunk_size=16)
    if name == "mamba2-2.7b":
        return ModelConfig(vocab_size=512, d_model=64, layers=("mamba2",) * 4, mamba2=m2, tie_embeddings=True,
                           model_type="mamba2")
    if name == "mamba2-hybrid-8b":
        return ModelConfig(vocab_size=512, d_model=64, layers=layers_from_pattern("M-M*-M-M*-"),
                           mamba2=dataclasses.replace(m2, n_groups=2),
                           attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=16),
                           mlp=MLPConfig(d_ff=256, activation="gelu"), model_type="nemotron_h")
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def _init_value(path: tuple, shape, dtype, key):
    """Plausible random values by parameter name (the timing does not depend on them, but finite
    activations keep the run honest)."""
    name = str(path[-1])
    if name == "A_log":
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)
    if name == "dt_bias" or (name == "bias" and len(path) > 1 and str(path[-2]) == "dt_proj"):
        dt = jax.random.uniform(key, shape, jnp.float32, 1e-3, 1e-1)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    if name in ("D", "weight", "norm_weight"):  # skips and norm weights
        return jnp.ones(shape, dtype)
    if name in ("bias", "conv_bias", "e_score_correction_bias"):
        return jnp.zeros(shape, dtype)
    if name == "conv_weight":
        return jax.random.uniform(key, shape, jnp.float32, -0.5, 0.5).astype(dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16) -> LanguageModel:
    """Random weights made on the device by one compiled call (no per-parameter eager init)."""
    abstract = nnx.eval_shape(lambda: LanguageModel(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abstract_state))

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(flat))
        return [_init_value(path, var.shape, var.dtype, k) for (path, var), k in zip(flat, keys)]

    values = init(jax.random.key(0))
    state = nnx.from_flat_state([(path, var.replace(v)) for (path, var), v in zip(flat, values)])
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ byte counting

def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def decode_step_bytes(model: LanguageModel, batch: int, max_len: int, *, state_bytes_per_elem: int | None = None):
    """HBM bytes one decode step moves: weights, SSM/conv state (read + write), KV cache (read)."""
    cfg = model.config
    weights = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = _nbytes(var)
        if path[0] == "embed" and not cfg.tie_embeddings:
            n = min(n, batch * cfg.d_model * jnp.dtype(var.dtype).itemsize)  # only the looked-up rows
        if path[0] == "blocks" and str(path[-1]) in ("gate_proj", "up_proj", "down_proj") and cfg.moe is not None \
                and len(var.shape) == 4:  # (repeats, experts, ., .): experts a step can touch
            n = n * min(1.0, batch * cfg.moe.top_k / cfg.moe.n_experts)
        weights += int(n)
    parts = cache_bytes(cfg, batch, max_len, model.dtype)
    ssm = parts["ssm"] if state_bytes_per_elem is None else parts["ssm"] // 4 * state_bytes_per_elem
    return {"weights": weights, "state": 2 * (ssm + parts["conv"]), "kv": parts["kv"]}


# ------------------------------------------------------------------------------------- timing

def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(model, batch: int, prompt_len: int, gen_len: int, repeats: int) -> dict:
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, prompt_len)).astype(np.int32)
    stream = TokenStream(model, ids, max_new_tokens=gen_len, chunk=gen_len)
    compile_s = stream.compile()

    def prefill():
        jax.block_until_ready(stream.start_state().generated)

    prefill()  # warm-up
    prefill_s = _median_time(prefill, repeats)

    decode_times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        state = stream.start_state()
        jax.block_until_ready(state.generated)
        t0 = time.perf_counter()
        state = stream.advance_state(state, gen_len)
        jax.block_until_ready(state.generated)
        decode_times.append(time.perf_counter() - t0)
        assert int(state.step) == gen_len
    decode_s = statistics.median(decode_times[1:])
    return {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": decode_s}


# -------------------------------------------------------------------------------- mamba_ssm

def import_mamba_ssm():
    """mamba_ssm's LM from ``.peers`` with its CUDA extensions stubbed; None (and why) if unavailable."""
    peers = ROOT / ".peers"
    if peers.is_dir() and str(peers) not in sys.path:
        sys.path.insert(0, str(peers))
    try:
        import torch
    except ImportError as e:
        return None, f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return None, "no CUDA device for torch"
    if importlib.util.find_spec("mamba_ssm") is None:
        return None, "mamba_ssm is not importable (run ../shared/peers/get_peers.sh and carry .peers)"
    for name in ("selective_scan_cuda", "causal_conv1d_cuda", "causal_conv1d", "causal_conv1d_varlen"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)  # imports of its names fail -> mamba_ssm's fallbacks
    import transformers.generation as tg  # transformers 5 dropped the aliases mamba_ssm imports
    for alias in ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput"):
        if not hasattr(tg, alias):
            setattr(tg, alias, tg.GenerateDecoderOnlyOutput)
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.utils.generation import InferenceParams
    except Exception as e:  # noqa: BLE001 - report whatever broke the import
        return None, f"mamba_ssm import failed: {type(e).__name__}: {e}"
    return (torch, MambaConfig, MambaLMHeadModel, InferenceParams), None


def bench_mamba_ssm(mods, cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, repeats: int) -> dict:
    torch, MambaConfig, MambaLMHeadModel, InferenceParams = mods
    m2 = cfg.mamba2
    config = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size,
                         ssm_cfg=dict(layer="Mamba2", d_state=m2.d_state, d_conv=m2.d_conv, headdim=m2.head_dim,
                                      ngroups=m2.n_groups, expand=m2.d_inner // cfg.d_model, chunk_size=m2.chunk_size),
                         rms_norm=True, residual_in_fp32=cfg.residual_in_fp32, fused_add_norm=True,
                         pad_vocab_size_multiple=16, tie_embeddings=cfg.tie_embeddings)
    torch.manual_seed(0)
    model = MambaLMHeadModel(config, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")
    max_length = prompt_len + gen_len

    def sync_time(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def prefill():
        params = InferenceParams(max_seqlen=max_length, max_batch_size=batch)
        model(ids, inference_params=params, num_last_tokens=1)

    @torch.inference_mode()
    def generate():
        out = model.generate(ids, max_length=max_length, cg=True, top_k=1, return_dict_in_generate=True)
        assert out.sequences.shape == (batch, max_length), out.sequences.shape

    t0 = time.perf_counter()
    generate()  # captures the CUDA graph
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    prefill()
    prefill_s = statistics.median(sync_time(prefill) for _ in range(repeats))
    total_s = statistics.median(sync_time(generate) for _ in range(repeats))
    del model
    torch.cuda.empty_cache()
    return {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": max(total_s - prefill_s, 1e-9)}


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny models of the same layouts (CPU smoke run)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64; --small 1,4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 512 (--small: 24)")
    parser.add_argument("--gen-len", type=int, default=None, help="new tokens per row (default 128; --small: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median); default 5")
    parser.add_argument("--peak-bw", type=float, default=3.35e12, help="peak HBM bytes/s (H100 SXM: 3.35e12)")
    parser.add_argument("--no-peer", action="store_true", help="skip mamba_ssm")
    args = parser.parse_args(argv)

    batches = [int(b) for b in (args.batches or ("1,4" if args.small else "1,64")).split(",")]
    prompt_len = args.prompt_len or (24 if args.small else 512)
    gen_len = args.gen_len or (8 if args.small else 128)
    repeats = args.repeats or (2 if args.small else 5)
    if gen_len < 2:
        parser.error("--gen-len must be >= 2 (one prefill token plus at least one decode step)")
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            parser.error(f"unknown model {n!r}; expected one of {MODELS}")

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"prompt {prompt_len}, new tokens {gen_len}, batches {batches}, peak {args.peak_bw:.3g} B/s", flush=True)
    peer, why = (None, "--no-peer") if args.no_peer else import_mamba_ssm()
    if peer is None:
        print(f"mamba_ssm: skipped ({why})", flush=True)

    rows = []
    for name in names:
        cfg = small_config(name) if args.small else load_preset(name)
        t0 = time.perf_counter()
        model = random_model(cfg)
        jax.block_until_ready(nnx.state(model))
        print(f"\n{name}: {cfg.n_layers} sublayers, period {cfg.period}, random bf16 weights "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        for batch in batches:
            max_len = prompt_len + gen_len - 1
            runs = [("jamba_jax", lambda: bench_jax(model, batch, prompt_len, gen_len, repeats),
                     decode_step_bytes(model, batch, max_len))]
            if peer is not None and set(cfg.layers) == {"mamba2"}:
                runs.append(("mamba_ssm cg", lambda: bench_mamba_ssm(peer, cfg, batch, prompt_len, gen_len, repeats),
                             decode_step_bytes(model, batch, max_len, state_bytes_per_elem=2)))
            for impl, run, step_bytes in runs:
                try:
                    r = run()
                except Exception as e:  # noqa: BLE001 - one failed configuration should not end the run
                    print(f"  {impl:<13} batch {batch:>3}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                steps = gen_len - 1
                step_s = r["decode_s"] / steps
                total_bytes = sum(step_bytes.values())
                row = dict(model=name, impl=impl, batch=batch,
                           prefill_tps=batch * prompt_len / r["prefill_s"], decode_tps=batch * steps / r["decode_s"],
                           step_ms=1e3 * step_s, mb_step=total_bytes / 1e6,
                           hbm=total_bytes / step_s / args.peak_bw, compile_s=r["compile_s"])
                rows.append(row)
                print(f"  {impl:<13} batch {batch:>3}: prefill {row['prefill_tps']:>10.0f} tok/s, decode "
                      f"{row['decode_tps']:>9.1f} tok/s ({row['step_ms']:.2f} ms/step; "
                      + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in step_bytes.items())
                      + f"; {row['hbm']:.1%} of peak HBM); compile/capture {r['compile_s']:.1f} s", flush=True)
        del model

    print("\n| model | impl | batch | prefill tok/s | decode tok/s | ms/step | MB/step | HBM BW |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['impl']} | {r['batch']} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
              f"{r['step_ms']:.2f} | {r['mb_step']:.1f} | {r['hbm']:.1%} |")


if __name__ == "__main__":
    main()
