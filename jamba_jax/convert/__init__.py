"""PyTorch checkpoints in and out: ``from_pretrained`` and ``save_pretrained`` (transformers layout)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jamba_jax.config import ModelConfig
from jamba_jax.convert import families, hybrids  # noqa: F401  (registers the model families)
from jamba_jax.convert.families import FAMILIES, get_family, is_mamba_ssm_config, mamba_ssm_config
from jamba_jax.convert.io import read_config, read_tensors, write_checkpoint
from jamba_jax.convert.rules import hf_shapes, resolve_layouts
from jamba_jax.model import LanguageModel
from jamba_jax.params import flat_params, model_from_flat, param_shapes

__all__ = ["from_pretrained", "save_pretrained", "config_from_pretrained", "FAMILIES"]


def config_from_pretrained(path: str | os.PathLike) -> tuple[ModelConfig, list]:
    """The `ModelConfig` of a checkpoint directory and the weight rules that go with it."""
    hf = read_config(path)
    if is_mamba_ssm_config(hf):
        return mamba_ssm_config(hf)
    family = get_family(hf.get("model_type"))
    cfg = family.config_from_hf(hf)
    return cfg, family.rules(cfg)


def _check_tensors(cfg: ModelConfig, rules: list, tensors: dict) -> None:
    """One error naming every missing, unexpected or mis-shaped checkpoint tensor."""
    shapes = param_shapes(cfg)
    known = {name for r in rules for name in r.hf_names}
    missing, misshaped = [], []
    for r in rules:
        for n, shape in hf_shapes(r, shapes).items():
            if n not in tensors:
                missing.append(f"{n} {shape}")
            elif tuple(tensors[n].shape) != shape:
                misshaped.append(f"{n}: expected {shape}, found {tuple(tensors[n].shape)}")
    unexpected = [f"{n} {tuple(tensors[n].shape)}" for n in sorted(set(tensors) - known)]
    if missing or misshaped or unexpected:
        lines = [f"checkpoint tensors do not match the {cfg.model_type} config:"]
        lines += [f"  missing: {m}" for m in missing] + [f"  mis-shaped: {m}" for m in misshaped]
        lines += [f"  unexpected: {u}" for u in unexpected]
        raise ValueError("\n".join(lines))


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
                    impl: str = "auto") -> LanguageModel:
    """Load a local checkpoint directory (transformers or mamba_ssm layout) as a `LanguageModel`.

    ``dtype`` is the activation dtype; matrices are stored in ``param_dtype``; SSM parameters and
    norms stay float32.
    """
    cfg, rules = config_from_pretrained(path)
    tensors = read_tensors(path)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head saved alongside the embedding
    rules = resolve_layouts(rules, tensors)  # checkpoints written in an older layout (per-expert tensors, ...)
    _check_tensors(cfg, rules, tensors)
    flat = {}
    for rule in rules:
        flat.update(rule.to_ours(tensors))
    return model_from_flat(cfg, flat, dtype=dtype, param_dtype=param_dtype, impl=impl)


def _infer_model_type(cfg: ModelConfig) -> str:
    kinds = set(cfg.layers)
    if kinds == {"mamba1"}:
        return "falcon_mamba" if cfg.mamba1.bcdt_norm == "weightless" else "mamba"
    if kinds == {"mamba2"}:
        return "mamba2"
    for model_type in ("nemotron_h", "jamba", "bamba", "granitemoehybrid"):
        if model_type in FAMILIES:
            try:
                FAMILIES[model_type].config_to_hf(cfg)
                return model_type
            except ValueError:
                continue
    raise ValueError(f"no transformers model_type can hold layers {sorted(kinds)}")


def save_pretrained(model: LanguageModel, path: str | os.PathLike, *, dtype=None) -> None:
    """Write ``model`` as a transformers checkpoint directory (config.json + safetensors).

    ``dtype`` (e.g. ``jnp.bfloat16``) casts floating tensors on the way out; default: as stored.
    """
    cfg = model.config
    model_type = cfg.model_type if cfg.model_type in FAMILIES else _infer_model_type(cfg)
    family = get_family(model_type)
    hf = family.config_to_hf(cfg)
    flat = flat_params(model)
    tensors = {}
    for rule in family.rules(cfg):
        tensors.update(rule.to_hf(flat))
    if dtype is not None:
        tensors = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) or v.dtype == jnp.bfloat16 else v
                   for k, v in tensors.items()}
    # transformers >= 5 reads "dtype", earlier releases "torch_dtype": both name the tensors' dtype
    hf["dtype"] = hf["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    write_checkpoint(path, hf, tensors)
