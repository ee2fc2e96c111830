"""Building blocks shared by every sublayer: logical-axis parameters, dense layers, RMSNorm.

Model code names *logical* axes only; `jamba_jax.sharding` maps them to mesh axes. The names:
``vocab, embed, mlp, heads, kv_heads, head_dim, ssm_inner, ssm_heads, ssm_state, conv_kernel,
dt_rank, expert, layers`` (the stacked/scanned layer axis).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

default_kernel_init = nnx.initializers.normal(0.02)


def logical(init, *names: str | None):
    """Wrap an initializer so its parameter carries logical axis names (no eager sharding)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def param(rngs: nnx.Rngs | None, init, shape, names: tuple[str | None, ...], dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axis names; ``rngs=None`` for deterministic initializers."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


#: Set by `activation_sharding`: logical names and shape of an activation -> its ``NamedSharding``.
_activation_sharding: Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding] | None = None


@contextlib.contextmanager
def activation_sharding(rule: Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding]):
    """While tracing inside this context, `logical_sharding` places activations by ``rule`` (a
    trainer passes its mesh's logical-axis table: `jamba_jax.train.sharding.activation_sharding`)
    for the layers that must know it (`jamba_jax.layers.attention.per_device`)."""
    global _activation_sharding
    previous, _activation_sharding = _activation_sharding, rule
    try:
        yield
    finally:
        _activation_sharding = previous


def logical_sharding(x: jax.Array, names: Sequence[str | None]) -> jax.sharding.Sharding | None:
    """The sharding an activation with logical axis ``names`` gets (None outside `activation_sharding`)."""
    return None if _activation_sharding is None else _activation_sharding(names, x.shape)


def dense(d_in: int, d_out: int, names: tuple[str | None, str | None], *, bias: bool = False,
          dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, kernel_init=default_kernel_init) -> nnx.Linear:
    """``nnx.Linear`` with kernel ``(d_in, d_out)`` annotated with logical axes ``names``."""
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=logical(kernel_init, *names),
        bias_init=logical(nnx.initializers.zeros_init(), names[1]),
        rngs=rngs,
    )


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x)`` over the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm with a float32 weight; normalises in float32 and returns ``dtype``."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, axis_name: str = "embed"):
        self.weight = param(None, nnx.initializers.ones_init(), (dim,), (axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return (self.weight[...] * rms_normalize(x, self.eps)).astype(self.dtype)


def activation(name: str):
    """Elementwise activation by name (the gated variants use their gate's activation)."""
    return {
        "silu": jax.nn.silu,
        "swiglu": jax.nn.silu,
        "relu2": lambda x: jnp.square(jax.nn.relu(x)),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "geglu": lambda x: jax.nn.gelu(x, approximate=False),
    }[name]


GATED_ACTIVATIONS = ("swiglu", "geglu")
