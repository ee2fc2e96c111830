"""A flat, stable naming of a model's parameters, independent of how the stack is stored.

``layers.{i}.<path>`` names sublayer ``i`` (``i = repetition * period + position``), other names are
the module paths (``embed.embedding``, ``final_norm.weight``, ``lm_head.kernel``). Weight converters
and parameter counts work on this naming; the stacked ``(repeats, ...)`` storage stays private.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jamba_jax.config import ModelConfig
from jamba_jax.model import LanguageModel


def _walk(state, period: int) -> Iterator[tuple[str, tuple, object, int | None]]:
    """Yield ``(flat name, nnx path, variable, repetition index or None)`` for every variable slice."""
    for path, var in nnx.to_flat_state(state):
        if path[0] == "blocks":
            pos, rest = path[1], ".".join(str(p) for p in path[2:])
            for r in range(var.shape[0]):
                yield f"layers.{r * period + pos}.{rest}", path, var, r
        else:
            yield ".".join(str(p) for p in path), path, var, None


def abstract_model(cfg: ModelConfig, **kwargs) -> LanguageModel:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes without allocating weights."""
    return nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0), **kwargs))


def param_shapes(cfg: ModelConfig, **kwargs) -> dict[str, tuple[tuple[int, ...], object]]:
    """Flat name -> (shape, dtype) for every variable, without allocating weights."""
    state = nnx.state(abstract_model(cfg, **kwargs))
    out = {}
    for name, _, var, r in _walk(state, cfg.period):
        shape = tuple(var.shape[1:]) if r is not None else tuple(var.shape)
        out[name] = (shape, var.dtype)
    return out


def flat_params(model: LanguageModel) -> dict[str, np.ndarray]:
    """Flat name -> host array for every variable of ``model`` (parameters and buffers)."""
    out = {}
    for name, _, var, r in _walk(nnx.state(model), model.config.period):
        value = np.asarray(jax.device_get(var[...]))
        out[name] = value[r] if r is not None else value
    return out


def model_from_flat(cfg: ModelConfig, flat: dict[str, np.ndarray], *, dtype=jnp.float32,
                    param_dtype=jnp.float32, impl: str = "auto") -> LanguageModel:
    """Build a model whose variables come from ``flat`` (no random init of the full model).

    Every expected name must be present with its shape; unexpected names are an error too. One
    ``ValueError`` lists all problems. Values are cast to each variable's dtype (float32 for the SSM
    parameters and norms whatever ``param_dtype`` says).
    """
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl)
    graphdef, state = nnx.split(abstract)
    period = cfg.period
    missing, misshaped = [], []
    expected = set()
    slices: dict[tuple, list] = {}
    for name, path, var, r in _walk(state, period):
        expected.add(name)
        shape = tuple(var.shape[1:]) if r is not None else tuple(var.shape)
        if name not in flat:
            missing.append(f"{name} {shape}")
            continue
        value = np.asarray(flat[name])
        if tuple(value.shape) != shape:
            misshaped.append(f"{name}: expected {shape}, found {tuple(value.shape)}")
            continue
        slices.setdefault(path, [None] * (var.shape[0] if r is not None else 1))[r or 0] = value
    unexpected = sorted(set(flat) - expected)
    if missing or misshaped or unexpected:
        lines = [f"weights do not match the {cfg.model_type} model:"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  mis-shaped: {m}" for m in misshaped]
        lines += [f"  unexpected: {u} {tuple(np.shape(flat[u]))}" for u in unexpected]
        raise ValueError("\n".join(lines))
    items = []
    for path, var in nnx.to_flat_state(state):
        parts = slices[path]
        value = np.stack(parts) if path[0] == "blocks" else parts[0]
        items.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(items))


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def count_params(cfg: ModelConfig, *, active: bool = False) -> int:
    """Trainable parameters (``nnx.Param``), from shapes only. ``active=True`` counts what one token
    uses: of each MoE layer's routed experts only ``top_k`` of ``n_experts``."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    total = 0
    for name, path, var, r in _walk(state, cfg.period):
        size = int(np.prod(var.shape[1:] if r is not None else var.shape))
        kind = cfg.layers[int(name.split(".")[1])] if r is not None else None
        if active and kind == "moe" and path[-1] in EXPERT_WEIGHTS and path[-2] == "mixer":
            size = size * cfg.moe.top_k // cfg.moe.n_experts
        total += size
    return total
