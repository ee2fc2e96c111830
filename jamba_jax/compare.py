"""Numerics comparison against the PyTorch reference, layer by layer.

``python -m jamba_jax.compare --model DIR`` loads the same checkpoint into transformers
(``AutoModelForCausalLM.from_pretrained(DIR)``, float32) and into jamba_jax (`from_pretrained`),
runs the same tokens through both and prints, per layer, the relative L2 and max abs error of the
residual stream, then the logits' relative L2, KL divergence and top-1 agreement. It exits 1 when the
logits' relative L2 is above the tolerance of the dtype (see *Tolerances*), 2 on bad input.
`compare` is the library entry point and returns the report as a dict (``--json`` writes it).

What transformers' ``hidden_states`` tuple holds (checked at run time, an error if it changes):

* ``mamba``, ``falcon_mamba``, ``mamba2``: ``n + 1`` entries, *no* embeddings: entry ``i < n`` is the
  output of layer ``i``, entry ``n`` the last one after the final norm.
* ``jamba``, ``bamba``, ``granitemoehybrid``, ``nemotron_h`` (transformers' ``capture_outputs``):
  ``n + 1`` entries, the embeddings first: entry ``0`` is the input of layer 0, entry ``i``
  (``1 <= i < n``) the output of layer ``i - 1``, entry ``n`` the last layer's output *after* the
  final norm (the raw one is dropped).

Our stack has one sublayer per mixer (`jamba_jax.model`): a Jamba, Bamba or Granite decoder layer
``i`` is our sublayers ``2i`` (Mamba or attention) and ``2i + 1`` (MLP or MoE); Mamba, Mamba-2 and
Nemotron-H blocks are one sublayer each. What the tuple does not hold is captured with forward hooks:
the input of the final norm (the last layer's raw output) and, for decoder layers of two sublayers,
the input of each layer's feed-forward norm (`FF_NORM`: the residual stream between the mixer and the
feed-forward), so every one of our sublayers has a counterpart. The embeddings are compared too, from
``get_input_embeddings()``, times Granite's ``embedding_multiplier``: the residual stream that enters
layer 0.

mamba_ssm's own checkpoint layout (config.json with ``d_model``/``n_layer``/``ssm_cfg``, a
``pytorch_model.bin`` of ``MambaLMHeadModel``) has no transformers twin, so the reference is built
by *converting the checkpoint in memory to the transformers mamba / mamba2 layout* and running
transformers on it: ``backbone.embedding.`` becomes ``backbone.embeddings.``, every other tensor
name is already the same, and the config fields are translated (`mamba_ssm_reference`). We chose
this over comparing with our own sequential reference path (``impl="reference"``) because that
path shares everything but the scan with the model under test (weight mapping, conv, norms,
projections, gating), so a bug there would be on both sides and go unseen; transformers' modules are
an independent port of mamba_ssm's with the same parameter names, which is the closest thing to
running mamba_ssm itself (its CUDA/Triton kernels do not run on a CPU). Settings transformers cannot
express (LayerNorm instead of RMSNorm, ``d_ssm``, ``norm_before_gate``, a per-channel ``D``, an
epsilon other than mamba_ssm's fixed 1e-5 for the gated norm) raise an error naming the field.

Tolerances (`TOLERANCES`): the reference always runs in float32 (TF32 off on CUDA, and our float32
matmuls at "highest" precision), so the number measures how far *our* forward is from the exact
function at the chosen dtype.

* ``float32``: 1e-4 relative L2 on the logits. Both sides compute the same function in float32
  (unit roundoff 6e-8), differing only in summation order, fused kernels and chunked versus
  sequential scans; on the test models the logits agree to ~1e-6. 1e-4 leaves two orders of
  magnitude of room for deeper models and long sequences, while any real mistake (a transposed or
  mis-sliced weight, a missing norm, a wrong epsilon or ``dt`` clamp) moves the logits by far more.
* ``bfloat16`` (our activations *and* stored matrices in bfloat16; SSM parameters, norms and the
  residual stream stay float32): per row, ``max(3e-2, 1.5 x transformers' own bfloat16 error)``,
  where the *yardstick* is the reference run once more after casting it to bfloat16. bfloat16 keeps
  8 significant bits, a unit roundoff of ``u = 2**-9 ~ 2e-3`` per rounding; roundings of weights
  and activations are close to independent, so their relative errors add roughly in quadrature and
  grow with depth. Measured on random-weight models (logits, 2 x 128 tokens), ours / transformers'
  bfloat16 against float32: Mamba-1 6 layers 9.7e-3 / 9.9e-3, 24 layers 2.1e-2 / 2.1e-2; Mamba-2
  6 layers 1.9e-2 / 1.8e-2, 24 layers 4.9e-2 / 4.8e-2. A fixed number would either flag correct deep
  models or let shallow bugs through; "no worse than the reference implementation at the same
  precision" does neither. 1.5 covers the two implementations rounding at different places, and
  the floor 3e-2 (~15 u, the quadrature sum of ~225 roundings) keeps shallow models from being held
  to less than their noise. A real bug gives errors of order 0.1 to 1. ``--no-yardstick`` skips the
  extra forward and uses the plain 3e-2.

Every row (embeddings, sublayers, final norm) is held to the same rule; the first row above its
tolerance is reported as the first divergence, which is where a wrong weight or op sits.
KL divergence (``KL(torch || ours)``, mean over positions, in nats) and top-1 agreement are
reported but do not decide the exit code: top-1 flips wherever two logits are within the error,
which random-weight models have plenty of.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

#: Relative L2 on the logits above which the comparison fails, per dtype (see the module docstring).
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2}
#: In bfloat16 we also allow this many times transformers' own bfloat16 error (see the module docstring).
YARDSTICK_FACTOR = 1.5

#: Per model type: (sublayers per transformers layer, does ``hidden_states`` start with the embeddings).
HIDDEN_STATES_LAYOUT = {
    "mamba": (1, False),
    "falcon_mamba": (1, False),
    "mamba2": (1, True),
    "jamba": (2, True),
    "bamba": (2, True),
    "nemotron_h": (1, True),
    "granitemoehybrid": (2, True),
}
#: The norm in front of the feed-forward of a two-sublayer decoder layer, per model type.
FF_NORM = {"jamba": "pre_ff_layernorm", "bamba": "pre_ff_layernorm", "granitemoehybrid": "post_attention_layernorm"}


# --------------------------------------------------------------------------------------------- metrics

def rel_l2(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (``inf`` if the reference is zero and the
    difference is not)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: ours {a.shape}, reference {e.shape}")
    diff = float(np.linalg.norm((a - e).ravel()))
    ref = float(np.linalg.norm(e.ravel()))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def max_abs(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)), initial=0.0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits, logits) -> float:
    """``KL(softmax(ref) || softmax(ours))`` per position, averaged over positions (nats)."""
    lp, lq = _log_softmax(ref_logits), _log_softmax(logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def top1_agreement(ref_logits, logits) -> float:
    return float(np.mean(np.argmax(np.asarray(ref_logits), -1) == np.argmax(np.asarray(logits), -1)))


# --------------------------------------------------------------------------- mamba_ssm as transformers

def mamba_ssm_reference(model_dir: str | os.PathLike):
    """A transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (float32, eval) holding a mamba_ssm
    ``MambaLMHeadModel`` checkpoint, converted in memory (see the module docstring)."""
    import torch
    import transformers

    from jamba_jax.convert.families import MAMBA_SSM_MAMBA2_FIXED
    from jamba_jax.convert.io import read_config, read_tensors

    hf = read_config(model_dir)
    ssm = dict(hf.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")

    def unsupported(field, value, why):
        raise ValueError(f"mamba_ssm reference: {field}={value!r} cannot be expressed in transformers' "
                         f"{layer} model ({why})")

    if not hf.get("rms_norm", True):
        unsupported("rms_norm", False, "transformers' Mamba blocks use RMSNorm")
    if hf.get("attn_layer_idx") or hf.get("d_intermediate", 0):
        unsupported("attn_layer_idx/d_intermediate", hf.get("attn_layer_idx") or hf.get("d_intermediate"),
                    "attention or MLP layers")
    d_model, n_layer = hf["d_model"], hf["n_layer"]
    vocab = hf.get("vocab_size", 50277)
    vocab += (-vocab) % hf.get("pad_vocab_size_multiple", 8)
    expand = ssm.get("expand", 2)
    eps = hf.get("norm_epsilon", 1e-5)
    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer, expand=expand,
                  state_size=ssm.get("d_state", 128 if layer == "Mamba2" else 16), conv_kernel=ssm.get("d_conv", 4),
                  use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True),
                  layer_norm_epsilon=eps, residual_in_fp32=hf.get("residual_in_fp32", True),
                  tie_word_embeddings=hf.get("tie_embeddings", True))
    if layer == "Mamba1":
        rank = ssm.get("dt_rank", "auto")
        config = transformers.MambaConfig(**common, intermediate_size=expand * d_model,
                                          time_step_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank))
    elif layer == "Mamba2":
        for name, default in MAMBA_SSM_MAMBA2_FIXED:
            if ssm.get(name, default) != default:
                unsupported(f"ssm_cfg.{name}", ssm[name], f"only {default!r} is")
        if eps != 1e-5:
            unsupported("norm_epsilon", eps, "one epsilon for the block norms and mamba_ssm's fixed 1e-5 of the "
                                             "gated norm")
        head_dim = ssm.get("headdim", 64)
        config = transformers.Mamba2Config(**common, num_heads=expand * d_model // head_dim, head_dim=head_dim,
                                           n_groups=ssm.get("ngroups", 1), chunk_size=ssm.get("chunk_size", 256),
                                           time_step_limit=tuple(ssm.get("dt_limit", (0.0, math.inf))))
    else:
        unsupported("ssm_cfg.layer", layer, "Mamba1 or Mamba2 only")

    state = {}
    for name, value in read_tensors(model_dir).items():
        if name.startswith("backbone.embedding."):
            name = "backbone.embeddings." + name[len("backbone.embedding."):]
        state[name] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    tied = config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"mamba_ssm reference: checkpoint does not match {type(model).__name__}: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if tied:
        model.tie_weights()
    return model


# ------------------------------------------------------------------------------------------- running

def _input_ids(model_dir, ours_cfg, ref_vocab: int, *, prompt, seq_len, batch, seed):
    """Token ids ``(batch, l)`` and a description. A prompt goes through ``DIR/tokenizer.json`` when
    there is one, else UTF-8 bytes (folded modulo the vocabulary if it is smaller than 256)."""
    vocab = min(ours_cfg.vocab_size, ref_vocab)
    if prompt is None:
        ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len))
        return ids, f"random ids in [0, {vocab}), seed {seed}"
    tok_file = Path(model_dir) / "tokenizer.json"
    if tok_file.exists():
        import tokenizers

        row = tokenizers.Tokenizer.from_file(str(tok_file)).encode(prompt).ids
        how = "tokenizer.json"
    else:
        row = list(prompt.encode("utf-8"))
        how = "UTF-8 bytes" if max(row, default=0) < vocab else f"UTF-8 bytes modulo {vocab}"
        row = [b % vocab for b in row]
    if not row:
        raise ValueError("--prompt encodes to no tokens")
    if max(row) >= vocab:
        raise ValueError(f"--prompt: tokenizer.json gives id {max(row)} >= the model's vocabulary {vocab}")
    return np.tile(np.asarray(row, np.int64), (batch, 1)), f"prompt {prompt!r} ({how}, {len(row)} tokens)"


def _decoder_layers(torch_model):
    base = torch_model.base_model
    for name in ("norm_f", "final_layernorm", "norm"):
        final_norm = getattr(base, name, None)
        if final_norm is not None:
            return base.layers, final_norm
    raise ValueError(f"cannot find the final norm of {type(torch_model).__name__}")


def run_reference(torch_model, ids: np.ndarray, model_type: str, device: str = "cpu") -> dict:
    """The reference's embeddings, residual stream per our sublayer, final-normed states and logits."""
    import torch

    n_sub, embeddings_first = HIDDEN_STATES_LAYOUT[model_type]
    layers, final_norm = _decoder_layers(torch_model)
    n = len(layers)
    captured = {}
    hooks = [final_norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("final_in", args[0]))]
    if n_sub == 2:
        for i, layer in enumerate(layers):
            hooks.append(getattr(layer, FF_NORM[model_type]).register_forward_pre_hook(
                lambda m, args, i=i: captured.__setitem__(("mid", i), args[0])))
    try:
        with torch.no_grad():
            t_ids = torch.as_tensor(ids, dtype=torch.long, device=device)
            out = torch_model(t_ids, output_hidden_states=True)
            emb = torch_model.get_input_embeddings()(t_ids)
            emb = emb * getattr(torch_model.base_model, "embedding_multiplier", 1.0)  # Granite's muP scalar
            final_is_normed = "final_in" in captured and torch.equal(out.hidden_states[-1],
                                                                     final_norm(captured["final_in"]))
    finally:
        for h in hooks:
            h.remove()
    np_ = lambda t: t.detach().float().cpu().numpy()
    hs = out.hidden_states
    if len(hs) != n + 1:
        raise RuntimeError(f"{type(torch_model).__name__}: hidden_states has {len(hs)} entries, expected "
                           f"{n + 1}; transformers changed what it returns (update HIDDEN_STATES_LAYOUT)")
    if embeddings_first != bool(torch.equal(hs[0].float(), emb.float())):
        raise RuntimeError(f"{type(torch_model).__name__}: hidden_states[0] is {'not ' if embeddings_first else ''}"
                           f"the embeddings; transformers changed what it returns (update HIDDEN_STATES_LAYOUT)")
    if not final_is_normed:
        raise RuntimeError(f"{type(torch_model).__name__}: hidden_states[-1] is not the final-normed output")
    streams, sources = [], []
    for i in range(n):  # the residual stream after each transformers layer (and its mixer, for pairs)
        if n_sub == 2:
            streams.append(np_(captured[("mid", i)]))
            sources.append(f"layers.{i}.{FF_NORM[model_type]} input")
        k = i + 1 if embeddings_first else i
        if k < n:
            streams.append(np_(hs[k]))
            sources.append(f"hidden_states[{k}]")
        else:
            streams.append(np_(captured["final_in"]))
            sources.append("final norm input")
    return dict(embeddings=np_(emb), streams=streams, sources=sources, final=np_(hs[-1]),
                logits=np_(out.logits), n_layers=n)


_FORWARD = None


def _forward(model, ids):
    """Embeddings, residual stream per sublayer, final-normed states and logits, jitted once per process
    (models of the same structure and input shape share the compiled function)."""
    global _FORWARD
    if _FORWARD is None:
        from flax import nnx

        @nnx.jit
        def forward(m, x):
            final, _, per_layer = m.hidden_states(x, return_all=True)
            return m.embed_tokens(x), per_layer, final, m.logits(final)

        _FORWARD = forward
    return _FORWARD(model, ids)


def run_ours(model, ids: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model.config.vocab_size})")
    emb, per_layer, final, logits = jax.device_get(_forward(model, jnp.asarray(ids)))
    f32 = lambda a: np.asarray(a, np.float32)
    return dict(embeddings=f32(emb), streams=[f32(s) for s in per_layer], final=f32(final), logits=f32(logits))


def _row(name, kind, hf_layer, source, ours, ref, ref_low) -> dict:
    row = dict(name=name, kind=kind, hf_layer=hf_layer, reference=source, rel_l2=rel_l2(ours, ref),
               max_abs=max_abs(ours, ref), ref_rms=float(np.sqrt(np.mean(np.square(ref, dtype=np.float64)))))
    if ref_low is not None:
        row["yardstick_rel_l2"] = rel_l2(ref_low, ref)
    return row


def _tolerance(dtype: str, yardstick: float | None) -> float:
    if yardstick is None or not math.isfinite(yardstick):
        return TOLERANCES[dtype]
    return max(TOLERANCES[dtype], YARDSTICK_FACTOR * yardstick)


def compare(model_dir: str | os.PathLike, *, dtype: str = "float32", seq_len: int = 64, batch: int = 2,
            prompt: str | None = None, torch_device: str = "cpu", seed: int = 0,
            jax_model_dir: str | os.PathLike | None = None, tolerance: float | None = None,
            impl: str = "auto", yardstick: bool = True) -> dict:
    """Compare jamba_jax with transformers on one checkpoint directory; returns the report dict.

    ``jax_model_dir``: load *our* side from another directory (default: ``model_dir``), e.g. a
    checkpoint written by `save_pretrained` after training, or a deliberately corrupted copy —
    with one directory both sides read the same bytes and only the code is compared.
    ``tolerance`` replaces the dtype's rule (`TOLERANCES`, and the yardstick for bfloat16) by one
    number for every row; ``impl`` is our SSM backend. ``yardstick`` (bfloat16 only): also run
    transformers in bfloat16 and allow ``YARDSTICK_FACTOR`` times its error.

    The report: ``rows`` (embeddings, one per sublayer, final norm; each with ``rel_l2``,
    ``max_abs``, ``tolerance``, the transformers layer and the tensor it was compared with, and
    ``yardstick_rel_l2`` in bfloat16), ``logits`` (rel_l2, max_abs, kl, top1, tolerance,
    yardstick_rel_l2), ``first_diverging`` (the first row above its tolerance, or None), ``passed``
    and the settings.
    """
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import jamba_jax
    from jamba_jax.convert.families import is_mamba_ssm_config
    from jamba_jax.convert.io import read_config

    if dtype not in TOLERANCES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(TOLERANCES)}")
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be positive, got {seq_len}, {batch}")
    if torch_device not in ("cpu", "cuda"):
        raise ValueError(f"torch_device={torch_device!r}: expected 'cpu' or 'cuda'")
    if torch_device == "cuda" and not torch.cuda.is_available():
        raise ValueError("torch_device='cuda', but this torch sees no CUDA device (use 'cpu')")
    model_dir = Path(model_dir)
    ours_dir = Path(jax_model_dir) if jax_model_dir is not None else model_dir
    t0 = time.perf_counter()

    hf = read_config(model_dir)
    mamba_ssm = is_mamba_ssm_config(hf)
    if torch_device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if mamba_ssm:
        torch_model = mamba_ssm_reference(model_dir)
        reference = f"transformers {type(torch_model).__name__} (mamba_ssm checkpoint converted in memory)"
    else:
        # experts as a plain loop: the most literal reference, and transformers' grouped-matmul kernel
        # refuses bfloat16 expert widths that are not a multiple of 8
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                        experts_implementation="eager").eval()
        reference = f"transformers {type(torch_model).__name__}"
    torch_model = torch_model.to(torch_device)
    model_type = torch_model.config.model_type
    if model_type not in HIDDEN_STATES_LAYOUT:
        raise ValueError(f"model_type {model_type!r} is not one we compare; supported: "
                         f"{', '.join(sorted(HIDDEN_STATES_LAYOUT))} and mamba_ssm's layout")
    t_ref_load = time.perf_counter()

    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        model = jamba_jax.from_pretrained(ours_dir, dtype=jdtype, param_dtype=jdtype, impl=impl)
        t_load = time.perf_counter()
        cfg = model.config
        vocab = hf.get("vocab_size", cfg.vocab_size) if mamba_ssm else torch_model.config.vocab_size  # unpadded
        ids, tokens = _input_ids(model_dir, cfg, vocab, prompt=prompt, seq_len=seq_len, batch=batch, seed=seed)
        ours = run_ours(model, ids)
    t_ours = time.perf_counter()
    ref = run_reference(torch_model, ids, model_type, torch_device)
    low = None
    if dtype == "bfloat16" and yardstick and tolerance is None:  # transformers' own bfloat16 error
        low = run_reference(torch_model.to(torch.bfloat16), ids, model_type, torch_device)
    t_ref = time.perf_counter()

    n_sub, _ = HIDDEN_STATES_LAYOUT[model_type]
    if len(ours["streams"]) != len(ref["streams"]) or cfg.n_layers != n_sub * ref["n_layers"]:
        raise ValueError(f"layer counts differ: ours {cfg.n_layers} sublayers, reference {ref['n_layers']} "
                         f"{model_type} layers x {n_sub}")
    lo = (lambda key, i=None: None) if low is None else (lambda key, i=None: low[key] if i is None else low[key][i])
    rows = [_row("embeddings", "embed", None, "get_input_embeddings()", ours["embeddings"], ref["embeddings"],
                 lo("embeddings"))]
    for i, (o, r, src) in enumerate(zip(ours["streams"], ref["streams"], ref["sources"])):
        rows.append(_row(f"sublayer {i}", cfg.layers[i], i // n_sub, src, o, r, lo("streams", i)) | {"sublayer": i})
    rows.append(_row("final norm", "norm", None, f"hidden_states[{ref['n_layers']}]", ours["final"], ref["final"],
                     lo("final")))
    logits = dict(rel_l2=rel_l2(ours["logits"], ref["logits"]), max_abs=max_abs(ours["logits"], ref["logits"]),
                  kl=kl_divergence(ref["logits"], ours["logits"]), top1=top1_agreement(ref["logits"], ours["logits"]))
    if low is not None:
        logits["yardstick_rel_l2"] = rel_l2(low["logits"], ref["logits"])
    for entry in rows + [logits]:
        entry["tolerance"] = (float(tolerance) if tolerance is not None
                              else _tolerance(dtype, entry.get("yardstick_rel_l2")))
    finite = bool(np.isfinite(ours["logits"]).all())
    first = next((r for r in rows if not r["rel_l2"] <= r["tolerance"]), None)
    passed = finite and logits["rel_l2"] <= logits["tolerance"]
    return dict(
        model_dir=str(model_dir), jax_model_dir=str(ours_dir), model_type=model_type,
        layout="mamba_ssm" if mamba_ssm else "transformers", reference=reference, dtype=dtype, impl=impl,
        torch_device=torch_device, tokens=tokens, input_shape=list(ids.shape), seed=seed,
        tolerance=logits["tolerance"], tolerance_rule=_rule(dtype, tolerance, low is not None),
        layers=list(cfg.layers), sublayers_per_hf_layer=n_sub, rows=rows, logits=logits, finite=finite,
        first_diverging=first, passed=passed,
        seconds=dict(load_reference=t_ref_load - t0, load_ours=t_load - t_ref_load, run_ours=t_ours - t_load,
                     run_reference=t_ref - t_ours),
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__))


def _rule(dtype: str, tolerance: float | None, with_yardstick: bool) -> str:
    if tolerance is not None:
        return f"{float(tolerance):.0e} (given)"
    if with_yardstick:
        return (f"max({TOLERANCES[dtype]:.0e}, {YARDSTICK_FACTOR} x transformers' own {dtype} error) per row "
                f"({dtype})")
    return f"{TOLERANCES[dtype]:.0e} ({dtype})"


# ------------------------------------------------------------------------------ inspection helpers

def ssd_matrix(dt, A, B, C, *, head: int = 0, batch: int = 0, dt_bias=None, dt_softplus: bool = False,
               dt_limit=(0.0, math.inf)):
    """The SSD of one head as a masked "attention" matrix (Mamba-2's state-space duality), in float64.

    Arguments as `pallas_kernels.ssd.ssd` (``dt (b, l, h)``, ``A (h,)``, ``B, C (b, l, g, n)``).
    Returns ``(M, L, dt)``: ``L[t, s] = exp(sum_{s<k<=t} dt_k A)`` for ``s <= t`` (else 0), the
    1-semiseparable decay mask; ``M = L * (C @ B.T)`` (``(l, l)``, lower triangular); and the
    preprocessed ``dt (l,)`` of the head, so that the head's output is
    ``y = M @ (dt[:, None] * x) + D * x`` for its input ``x (l, p)``.
    """
    from pallas_kernels.ssd.reference import preprocess_dt

    dt = np.asarray(preprocess_dt(np.asarray(dt)[batch:batch + 1], None if dt_bias is None else np.asarray(dt_bias),
                                  dt_softplus, tuple(dt_limit)), np.float64)[0, :, head]
    h, g = np.shape(A)[0], np.shape(B)[2]
    group = head // (h // g)
    Bh = np.asarray(B, np.float64)[batch, :, group]
    Ch = np.asarray(C, np.float64)[batch, :, group]
    a = np.cumsum(dt * float(np.asarray(A)[head]))
    log_decay = a[:, None] - a[None, :]
    causal = np.tril(np.ones((len(a), len(a)), bool))
    L = np.where(causal, np.exp(np.where(causal, log_decay, 0.0)), 0.0)
    return L * (Ch @ Bh.T), L, dt


def plot_layer_errors(reports, labels=None, ax=None, *, title: str | None = None):
    """Relative L2 error per row (embeddings, each sublayer, final norm, logits) of one or more
    `compare` reports on a log axis, each with its tolerance (dashed) and, for bfloat16, transformers'
    own bfloat16 error (dotted). Returns the axes."""
    import matplotlib.pyplot as plt

    reports = [reports] if isinstance(reports, dict) else list(reports)
    labels = labels or [r["dtype"] for r in reports]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.5 * (len(reports[0]["rows"]) + 1)), 3.8))
    floor = 1e-12  # exact agreement (the embeddings in float32) drawn at the floor
    for i, (report, label) in enumerate(zip(reports, labels)):
        entries = report["rows"] + [report["logits"]]
        x = range(len(entries))
        line, = ax.semilogy(x, [max(e["rel_l2"], floor) for e in entries], "o-", label=label)
        ax.semilogy(x, [e["tolerance"] for e in entries], "--", color=line.get_color(), lw=1)
        if all("yardstick_rel_l2" in e for e in entries):
            ax.semilogy(x, [max(e["yardstick_rel_l2"], floor) for e in entries], ":", color=line.get_color(),
                        lw=1.5, label=f"transformers in {report['dtype']}")
        if i == 0:
            names = [r["name"].replace("sublayer ", "") + ("" if r.get("sublayer") is None else f"\n{r['kind']}")
                     for r in report["rows"]] + ["logits"]
            ax.set_xticks(list(x), names, fontsize=7)
    ax.set_ylabel("relative L2 vs transformers (f32)")
    ax.set_title(title or f"{reports[0]['model_type']}: error per layer (dashed: tolerance)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


# ------------------------------------------------------------------------------------------- report

def format_report(report: dict) -> str:
    """The report as the table the command line prints."""
    yard = "yardstick_rel_l2" in report["logits"]
    lines = [f"jamba_jax ({report['dtype']}, impl={report['impl']}) vs {report['reference']} (float32, "
             f"{report['torch_device']})",
             f"model_type {report['model_type']} from {report['model_dir']}"
             + (f", ours from {report['jax_model_dir']}" if report["jax_model_dir"] != report["model_dir"] else ""),
             f"tokens: {report['tokens']}, shape {tuple(report['input_shape'])}",
             f"tolerance: {report['tolerance_rule']}", "",
             f"{'row':<12} {'kind':<10} {'HF layer':>8}  {'reference tensor':<32} {'rel L2':>9} {'max abs':>9}"
             + (f" {'HF bf16':>9}" if yard else "")]
    first = report["first_diverging"]
    for r in report["rows"]:
        hf_layer = "" if r["hf_layer"] is None else str(r["hf_layer"])
        mark = ("  <-- first divergence" if first is not None and r["name"] == first["name"] else
                "  !" if not r["rel_l2"] <= r["tolerance"] else "")
        lines.append(f"{r['name']:<12} {r['kind']:<10} {hf_layer:>8}  {r['reference']:<32} "
                     f"{r['rel_l2']:9.2e} {r['max_abs']:9.2e}" + (f" {r['yardstick_rel_l2']:9.2e}" if yard else "")
                     + mark)
    lg = report["logits"]
    lines += ["", f"logits: rel L2 {lg['rel_l2']:.3e}, max abs {lg['max_abs']:.3e}, "
                  f"KL(torch || ours) {lg['kl']:.3e} nats/position, top-1 agreement {100 * lg['top1']:.2f}%"]
    if yard:
        lines.append(f"transformers in bfloat16 vs float32 (yardstick): logits rel L2 {lg['yardstick_rel_l2']:.3e}")
    if not report["finite"]:
        lines.append("our logits are not all finite")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: logits rel L2 {lg['rel_l2']:.2e} {'<=' if report['passed'] else '>'} tolerance "
                 f"{lg['tolerance']:.1e} ({report['dtype']})")
    if first is not None:
        where = (f"sublayer {first['sublayer']} ({first['kind']}), HF layer {first['hf_layer']}"
                 if "sublayer" in first else first["name"])
        lines.append(f"first divergence at {where}: rel L2 {first['rel_l2']:.2e} > {first['tolerance']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jamba_jax.compare",
                                     description="Compare jamba_jax with transformers layer by layer on one "
                                                 "checkpoint; exit 1 above the dtype's tolerance.")
    parser.add_argument("--model", required=True, help="checkpoint directory (transformers or mamba_ssm layout)")
    parser.add_argument("--jax-model", default=None,
                        help="load jamba_jax from this directory instead (e.g. an exported or modified copy)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32",
                        help="our activation and matrix dtype (the reference is always float32)")
    parser.add_argument("--seq-len", type=int, default=64, help="random-token sequence length (default 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", default=None, help="text to run instead of random ids (tokenizer.json of "
                                                       "the model directory if present, else UTF-8 bytes)")
    parser.add_argument("--torch-device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="one relative L2 tolerance for every row instead of the dtype's rule (float32: 1e-4; "
                             "bfloat16: max(3e-2, 1.5 x transformers' own bfloat16 error))")
    parser.add_argument("--no-yardstick", action="store_true",
                        help="bfloat16: do not run transformers in bfloat16 too (saves a forward; plain 3e-2)")
    parser.add_argument("--impl", default="auto", help="our SSM backend (auto, xla, reference, ...)")
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    try:
        report = compare(args.model, dtype=args.dtype, seq_len=args.seq_len, batch=args.batch, prompt=args.prompt,
                         torch_device=args.torch_device, seed=args.seed, jax_model_dir=args.jax_model,
                         tolerance=args.tolerance, impl=args.impl, yardstick=not args.no_yardstick)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
