"""Initializers shared by the Mamba mixers (S4D-real ``A``, log-uniform ``dt``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
    """``softplus^{-1}(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]``, so ``softplus(bias)`` starts there."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def conv_init(key, shape, dtype=jnp.float32):
    """PyTorch Conv1d's default for a depthwise ``(k, c)`` kernel: uniform in ``±1/sqrt(k)``."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)
