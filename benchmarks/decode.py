"""Cached-generation throughput: prefill and decode tokens/s, ms per decode step and the HBM bandwidth
it reaches, for float32 and bfloat16 SSM state, against mamba_ssm in the same process.

Models (random weights, bfloat16 weights and activations):

* ``mamba2-2.7b``: the Mamba-2 2.7B shape (``configs/models/mamba2-2.7b.yaml``);
* ``mamba2-hybrid-8b``: the Mamba-2-Hybrid 8B shape (24 Mamba-2, 4 attention, 28 MLP sublayers).

Phases, in this order; each is one (model, implementation, state dtype, batch) and is skipped when
``--budget`` (seconds since start) would be exceeded: a phase runs only if the time so far plus an
estimate of it stays within the budget (the last duration of a phase of the same model and
implementation; for a model's first phase 1.5x the longest of the implementation so far):

1. ``mamba2-2.7b`` through mamba_ssm's ``MambaLMHeadModel.generate(..., cg=True)`` (CUDA-graph
   decode, Triton ``selective_state_update``, bfloat16 state; its CUDA extensions are stubbed, so the
   conv runs its PyTorch fallback), batch 1 then 64 -- first, so that torch has released the GPU
   memory it used before JAX takes any (JAX does not preallocate here: ``XLA_PYTHON_CLIENT_PREALLOCATE``
   defaults to false). Needs mamba_ssm importable from ``.peers`` (``../shared/peers/get_peers.sh``)
   and CUDA; skipped otherwise, or with ``--no-peer``.
2. ``mamba2-2.7b`` ours: bfloat16 state then float32 state at batch 1, then both at batch 64.
3. ``mamba2-hybrid-8b`` ours (mamba_ssm has no such model): bfloat16 state at batch 1 and 64, then
   float32 state at batch 1 and 64.

Every run uses the same prompt ids (one numpy draw per batch size), ``--prompt-len`` tokens per row
(default 512) and ``--gen-len`` new tokens (default 128: one from the prefill call, 127 decode
steps). Prefill tokens/s is ``batch * prompt_len`` over the prefill call (first token included);
decode tokens/s is ``batch * (gen_len - 1)`` over the decode loop (ours: one compiled
``while_loop`` call; mamba_ssm: ``generate`` minus its prefill). Medians of ``--repeats`` (default
3) after a warm-up. Defaults were chosen for one H100 in one 600 s call: mamba_ssm's Triton
autotuning (~95 s in a fresh process) and our compiles (one prefill + one decode loop per batch and
state dtype) dominate; the timed work is a few seconds per phase. Expect ~300-400 s in all; pass
``--budget`` a margin below the hard limit (default 420).

HBM fraction = the minimum bytes a decode step must move over the step time and ``--peak-bw``
(3.35e12 B/s: H100 SXM): every weight matrix read once (the embedding table only where it is also
the head), the SSM and conv state read once and written once in the run's state dtype, the whole
preallocated KV cache read. The same count is used for both implementations, so the fraction
compares them directly. Our Mamba-2 state update is the fused kernel of
`pallas_kernels.ssd.decode` (the state read once and written in place, as mamba_ssm's Triton
``selective_state_update`` does); a last phase runs the 2.7B at the largest batch with the XLA
update instead (`ssd_step` left to XLA) to show the kernel's effect. "vs mamba_ssm" is our decode tokens/s over mamba_ssm's at the same batch.

For each of our runs the compiled decode loop is searched for copies of SSM state or KV arrays
(`jamba_jax.cache.cache_copies_in_loop`: each would add the state's bytes to every step); they are
logged and stored (``whole_cache_writes``; expected none), and with ``$OUT`` set the HLO text is
saved gzipped under ``$OUT/hlo/``.

Output: a log line per run as it finishes, ``$OUT/decode.log`` and ``$OUT/decode.json`` (rewritten
after every phase) when ``$OUT`` (or ``--out``) is set, and a markdown table printed last.

    PYTHONPATH=.:.peers python benchmarks/decode.py       # GPU: both models, batch 1 and 64
    python benchmarks/decode.py --small                   # CPU smoke run: tiny models, same layouts
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (mamba_ssm) shares the device

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import gzip  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

T0 = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jamba_jax.cache import cache_bytes, cache_copies_in_loop, cache_shapes  # noqa: E402
from jamba_jax.config import AttentionConfig, Mamba2Config, MLPConfig, ModelConfig, layers_from_pattern  # noqa: E402
from jamba_jax.generate import TokenStream  # noqa: E402
from jamba_jax.model import LanguageModel  # noqa: E402
from jamba_jax.presets import load_preset  # noqa: E402

MODELS = ("mamba2-2.7b", "mamba2-hybrid-8b")
STATE_DTYPES = ("bfloat16", "float32")  # the default order of our runs
PEER = "mamba_ssm"


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


def decode_step_bytes(model: LanguageModel, batch: int, max_len: int, state_dtype) -> dict[str, int]:
    """The minimum HBM bytes of one decode step: weights read once, SSM/conv state read and written
    once (SSM state in ``state_dtype``), the preallocated KV cache read."""
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
    parts = cache_bytes(cfg, batch, max_len, model.dtype, state_dtype)
    return {"weights": weights, "state": 2 * (parts["ssm"] + parts["conv"]), "kv": parts["kv"]}


# ------------------------------------------------------------------------------------- timing

def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(model, ids: np.ndarray, gen_len: int, repeats: int, state_dtype: str, hlo_path=None) -> dict:
    batch, prompt_len = ids.shape
    stream = TokenStream(model, ids, max_new_tokens=gen_len, chunk=gen_len, state_dtype=state_dtype)
    compile_s = stream.compile()
    hlo = stream._advance_fn.as_text()
    shapes = cache_shapes(model.config, batch, prompt_len + gen_len - 1, model.dtype, state_dtype)
    copies = cache_copies_in_loop(hlo, shapes)
    if hlo_path is not None:
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(hlo_path, "wt") as f:
            f.write(hlo)
    del hlo

    def prefill():
        jax.block_until_ready(stream.start_state().generated)

    prefill()  # warm-up
    prefill_s = _median_time(prefill, repeats)

    decode_times = []
    state = None
    for _ in range(repeats + 1):  # the first is a warm-up
        state = None  # free the previous (donated, finished) state before the next prefill
        state = stream.start_state()
        jax.block_until_ready(state.generated)
        t0 = time.perf_counter()
        state = stream.advance_state(state, gen_len)
        jax.block_until_ready(state.generated)
        decode_times.append(time.perf_counter() - t0)
        assert int(state.step) == gen_len
    ssm = [layer.ssm.dtype for layer in state.cache.layers if hasattr(layer, "ssm")]
    assert all(jnp.dtype(d).name == state_dtype for d in ssm), (ssm, state_dtype)
    return {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": statistics.median(decode_times[1:]),
            "whole_cache_writes": copies}


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


def bench_mamba_ssm(mods, cfg: ModelConfig, ids: np.ndarray, gen_len: int, repeats: int) -> dict:
    torch, MambaConfig, MambaLMHeadModel, InferenceParams = mods
    m2 = cfg.mamba2
    config = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size,
                         ssm_cfg=dict(layer="Mamba2", d_state=m2.d_state, d_conv=m2.d_conv, headdim=m2.head_dim,
                                      ngroups=m2.n_groups, expand=m2.d_inner // cfg.d_model, chunk_size=m2.chunk_size),
                         rms_norm=True, residual_in_fp32=cfg.residual_in_fp32, fused_add_norm=True,
                         pad_vocab_size_multiple=16, tie_embeddings=cfg.tie_embeddings)
    torch.manual_seed(0)
    model = MambaLMHeadModel(config, device="cuda", dtype=torch.bfloat16).eval()
    batch, prompt_len = ids.shape
    ids = torch.as_tensor(ids, dtype=torch.long, device="cuda")
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
    generate()  # Triton autotuning (first call in the process) and the CUDA graph capture
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    prefill()
    prefill_s = statistics.median(sync_time(prefill) for _ in range(repeats))
    total_s = statistics.median(sync_time(generate) for _ in range(repeats))
    return {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": max(total_s - prefill_s, 1e-9)}


# ------------------------------------------------------------------------------------- plumbing

@dataclasses.dataclass(frozen=True)
class Phase:
    model: str
    impl: str          # "jamba_jax" | XLA_UPDATE (ours with the XLA state update) | PEER
    state_dtype: str   # the SSM state's dtype (mamba_ssm: bfloat16)
    batch: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.impl} state={self.state_dtype} batch={self.batch}"


XLA_UPDATE = "jamba_jax_xla_update"


def _mamba2_mixers(model):
    from jamba_jax.layers.mamba2 import Mamba2Mixer
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Mamba2Mixer)]


def plan(names: list[str], batches: list[int], state_dtypes: tuple[str, ...], peer: bool,
         xla_update: bool = True) -> list[Phase]:
    """The phases in run order (see the module docstring)."""
    phases = []
    for name in names:
        if peer and name == "mamba2-2.7b":
            phases += [Phase(name, PEER, "bfloat16", b) for b in batches]
        if name == "mamba2-2.7b":  # both dtypes at the small batch first, then at the next
            phases += [Phase(name, "jamba_jax", sd, b) for b in batches for sd in state_dtypes]
        else:  # the bigger model: the first dtype (bf16, the contender) at every batch first
            phases += [Phase(name, "jamba_jax", sd, b) for sd in state_dtypes for b in batches]
    if xla_update and "mamba2-2.7b" in names:  # last: the fused decode kernel's effect (XLA update instead)
        phases += [Phase("mamba2-2.7b", XLA_UPDATE, state_dtypes[0], max(batches))]
    return phases


class Run:
    """The clock (``--budget``), the log and the incremental JSON of one invocation."""

    def __init__(self, args, out: str | None):
        self.budget = args.budget
        self.out = Path(out) if out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.failed: list[dict] = []
        self.durations: dict[tuple[str, str], float] = {}
        self.meta = {"argv": sys.argv[1:], "budget_s": args.budget}

    @staticmethod
    def elapsed() -> float:
        return time.monotonic() - T0

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        if self.out:
            with open(self.out / "decode.log", "a") as f:
                f.write(line + "\n")

    def save(self) -> None:
        if self.out:
            tmp = self.out / "decode.json.tmp"
            tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows, "skipped": self.skipped,
                                       "failed": self.failed}, indent=1, default=str))
            os.replace(tmp, self.out / "decode.json")

    def estimate(self, phase: Phase) -> float:
        """The last duration of a phase of the same model and implementation; for a model's first
        phase, 1.5x the longest phase of the implementation so far (compiles dominate); else 0."""
        if (phase.model, phase.impl) in self.durations:
            return self.durations[(phase.model, phase.impl)]
        same = [d for (_, impl), d in self.durations.items() if impl == phase.impl]
        return 1.5 * max(same) if same else 0.0

    def fits(self, phase: Phase) -> bool:
        return not self.budget or self.elapsed() + self.estimate(phase) <= self.budget


def _row(phase: Phase, r: dict, step_bytes: dict, prompt_len: int, gen_len: int, peak_bw: float) -> dict:
    steps = gen_len - 1
    step_s = r["decode_s"] / steps
    total = sum(step_bytes.values())
    return dict(model=phase.model, impl=phase.impl, state_dtype=phase.state_dtype, batch=phase.batch,
                prompt_len=prompt_len, gen_len=gen_len,
                prefill_tps=phase.batch * prompt_len / r["prefill_s"], decode_tps=phase.batch * steps / r["decode_s"],
                step_ms=1e3 * step_s, step_bytes=step_bytes, mb_step=total / 1e6, hbm=total / step_s / peak_bw,
                compile_s=r["compile_s"], prefill_s=r["prefill_s"], decode_s=r["decode_s"],
                whole_cache_writes=r.get("whole_cache_writes"))


def table(rows: list[dict]) -> str:
    peer = {(r["model"], r["batch"]): r["decode_tps"] for r in rows if r["impl"] == PEER}
    lines = ["| model | batch | impl (SSM state) | prefill tok/s | decode tok/s | ms/step | HBM | vs mamba_ssm |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    for r in rows:
        ref = peer.get((r["model"], r["batch"]))
        ratio = f"{r['decode_tps'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['impl']} ({short[r['state_dtype']]}) | "
                     f"{r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['step_ms']:.2f} | {r['hbm']:.1%} | "
                     f"{ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny models of the same layouts (CPU smoke run)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64; --small 1,4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 512 (--small: 24)")
    parser.add_argument("--gen-len", type=int, default=None, help="new tokens per row (default 128; --small: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median); default 3")
    parser.add_argument("--state-dtypes", default=",".join(STATE_DTYPES),
                        help="our SSM state dtypes to run, in this order (default bfloat16,float32)")
    parser.add_argument("--peak-bw", type=float, default=3.35e12, help="peak HBM bytes/s (H100 SXM: 3.35e12)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; later phases are skipped past it (default 420; "
                             "--small: none; 0: none)")
    parser.add_argument("--no-peer", action="store_true", help="skip mamba_ssm")
    parser.add_argument("--no-xla-update", action="store_true", help="skip the XLA-update comparison phase")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="log/JSON/HLO directory (default $OUT)")
    args = parser.parse_args(argv)

    state_dtypes = tuple(d for d in args.state_dtypes.split(",") if d)
    for d in state_dtypes:
        if d not in ("float32", "bfloat16"):
            parser.error(f"--state-dtypes: {d!r} is not float32 or bfloat16")
    if args.budget is None and not args.small:
        args.budget = 420.0
    batches = [int(b) for b in (args.batches or ("1,4" if args.small else "1,64")).split(",")]
    prompt_len = args.prompt_len or (24 if args.small else 512)
    gen_len = args.gen_len or (8 if args.small else 128)
    repeats = args.repeats or (2 if args.small else 3)
    if gen_len < 2:
        parser.error("--gen-len must be >= 2 (one prefill token plus at least one decode step)")
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            parser.error(f"unknown model {n!r}; expected one of {MODELS}")

    run = Run(args, args.out)
    dev = jax.devices()[0]
    run.meta.update(jax=jax.__version__, device=dev.device_kind, backend=jax.default_backend(), prompt_len=prompt_len,
                    gen_len=gen_len, batches=batches, repeats=repeats, peak_bw=args.peak_bw, small=args.small)
    run.log(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()}); prompt {prompt_len}, "
            f"new tokens {gen_len}, batches {batches}, repeats {repeats}, budget {args.budget} s, "
            f"peak {args.peak_bw:.3g} B/s")
    peer, why = (None, "--no-peer") if args.no_peer else import_mamba_ssm()
    if peer is None:
        run.log(f"mamba_ssm: skipped ({why})")
    else:
        run.meta["torch"] = peer[0].__version__
    run.save()

    ids_for = {b: np.random.default_rng(b).integers(0, 1 << 30, size=(b, prompt_len)) for b in batches}
    configs = {name: small_config(name) if args.small else load_preset(name) for name in names}
    models: dict[str, LanguageModel] = {}
    abstract = {name: nnx.eval_shape(lambda c=cfg: LanguageModel(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                                rngs=nnx.Rngs(0)))
                for name, cfg in configs.items()}  # shapes only, for the byte counts

    for phase in plan(names, batches, state_dtypes, peer is not None, not args.no_xla_update):
        cfg = configs[phase.model]
        if not run.fits(phase):
            run.skipped.append(phase.label)
            run.log(f"SKIP {phase.label}: {run.elapsed():.0f} s + ~{run.estimate(phase):.0f} s "
                    f"> budget {args.budget:.0f} s")
            run.save()
            continue
        t_phase = time.monotonic()
        ids = ids_for[phase.batch] % cfg.vocab_size
        step_bytes = decode_step_bytes(abstract[phase.model], phase.batch, prompt_len + gen_len - 1, phase.state_dtype)
        try:
            if phase.impl == PEER:
                r = bench_mamba_ssm(peer, cfg, ids, gen_len, repeats)
                gc.collect()
                peer[0].cuda.empty_cache()  # hand torch's cached blocks back before JAX allocates
            else:
                if phase.model not in models:
                    for other in list(models):  # one of our models on the device at a time
                        del models[other]
                    gc.collect()
                    t0 = time.perf_counter()
                    models[phase.model] = random_model(cfg)
                    jax.block_until_ready(nnx.state(models[phase.model]))
                    run.log(f"{phase.model}: {cfg.n_layers} sublayers, period {cfg.period}, random bf16 weights "
                            f"in {time.perf_counter() - t0:.1f} s")
                for mixer in _mamba2_mixers(models[phase.model]):
                    mixer.decode_impl = "xla" if phase.impl == XLA_UPDATE else "auto"
                hlo = (run.out / "hlo" / f"{phase.model}_{phase.impl}_b{phase.batch}_{phase.state_dtype}"
                       "_decode.hlo.txt.gz" if run.out else None)
                r = bench_jax(models[phase.model], ids, gen_len, repeats, phase.state_dtype, hlo)
        except Exception as e:  # noqa: BLE001 - one failed configuration should not end the run
            run.failed.append({"phase": phase.label, "error": f"{type(e).__name__}: {e}"})
            run.log(f"FAILED {phase.label}: {type(e).__name__}: {str(e)[:2000]}")
            if run.out:
                with open(run.out / "decode.log", "a") as f:
                    f.write(traceback.format_exc())
            r = None
        if phase.impl == PEER:
            gc.collect()
            peer[0].cuda.empty_cache()
        run.durations[(phase.model, phase.impl)] = time.monotonic() - t_phase
        if r is not None:
            row = _row(phase, r, step_bytes, prompt_len, gen_len, args.peak_bw)
            run.rows.append(row)
            copies = r.get("whole_cache_writes")
            cpu_bf16 = bool(copies) and jax.default_backend() == "cpu" and all(" bf16[" in c for c in copies)
            run.log(f"  {phase.impl:<9} {phase.state_dtype:<8} batch {phase.batch:>3}: prefill "
                    f"{row['prefill_tps']:>9.0f} tok/s, decode {row['decode_tps']:>8.1f} tok/s "
                    f"({row['step_ms']:.2f} ms/step; "
                    + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in step_bytes.items())
                    + f"; {row['hbm']:.1%} of peak HBM); compile/capture {r['compile_s']:.1f} s"
                    + ("" if copies is None else f"; whole-cache writes in the decode loop: {len(copies)}"
                       + (f" {copies[:2]}" if copies else "")
                       + (" (expected on CPU: no in-place bfloat16 update there)" if cpu_bf16 else "")))
        run.save()
    models.clear()

    run.log(f"done in {run.elapsed():.0f} s; skipped {len(run.skipped)}, failed {len(run.failed)}")
    print("\n" + table(run.rows), flush=True)
    if run.out:
        with open(run.out / "decode.log", "a") as f:
            f.write("\n" + table(run.rows) + "\n")


if __name__ == "__main__":
    main()
