"""The optimizer: global-norm clipping, AdamW with masked weight decay, warmup + cosine schedule.

Weight decay skips the SSM dynamics (``A_log``, ``D``, ``dt_bias``), every norm weight, every bias and,
unless ``decay_embeddings``, the token embedding: decaying ``A_log`` towards 0 would push every
state's decay rate towards ``exp(-1)``, and norm gains and biases have no scale to regularise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jamba_jax.train.config import TrainConfig

NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def learning_rate_schedule(cfg: TrainConfig):
    """``step -> lr``: linear warmup to ``learning_rate`` over ``warmup_steps`` (the first update
    already uses ``lr / warmup_steps``), then a cosine down to ``learning_rate * min_lr_ratio`` at
    ``schedule_steps`` (default: ``steps``), and stays there."""
    peak, warmup, floor = cfg.learning_rate, cfg.warmup_steps, cfg.min_lr_ratio
    total = cfg.schedule_steps or cfg.steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def decays(names: list[str], decay_embeddings: bool = False) -> bool:
    """Whether the parameter at this path (module names then the parameter name) gets weight decay."""
    names = [n for n in names if n != "value"]  # the nnx.Variable's own pytree key
    leaf = names[-1] if names else ""
    if leaf in NO_DECAY_NAMES or leaf == "bias" or leaf.endswith("_bias"):
        return False
    if any("norm" in n for n in names):
        return False
    if names[:2] == ["embed", "embedding"]:
        return decay_embeddings
    return True


def decay_mask(params, decay_embeddings: bool = False):
    """A pytree of bools shaped like ``params``: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(_names(path), decay_embeddings), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping then AdamW, with the learning rate a hyperparameter held in the optimizer state
    (``opt_state.hyperparams["learning_rate"]``): the train step sets it from
    `learning_rate_schedule` of its own step counter, so the schedule follows the step even across
    skipped (non-finite) updates, and what is logged is what was used."""

    def adamw(learning_rate):
        parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
        parts.append(optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=lambda params: decay_mask(params, cfg.decay_embeddings)))
        return optax.chain(*parts)

    return optax.inject_hyperparams(adamw)(learning_rate=0.0)


def with_learning_rate(opt_state, lr):
    """``opt_state`` of `make_optimizer` with its learning rate set to ``lr``."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
