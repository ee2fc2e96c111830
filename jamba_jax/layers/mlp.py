"""Feed-forward sublayer: gated (SwiGLU / GeGLU) or plain (squared ReLU, GELU) MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jamba_jax.config import MLPConfig
from jamba_jax.layers.common import GATED_ACTIVATIONS, activation, dense


class MLP(nnx.Module):
    """``down(act(gate(x)) * up(x))`` for gated activations, else ``down(act(up(x)))``.

    Parameters: ``gate_proj`` (gated only) and ``up_proj`` kernels ``(d_model, d_ff)`` named
    ``('embed', 'mlp')``; ``down_proj`` kernel ``(d_ff, d_model)`` named ``('mlp', 'embed')``; biases
    per ``cfg.bias``. ``d_ff`` overrides ``cfg.d_ff`` (an MoE shared expert).
    """

    def __init__(self, cfg: MLPConfig, d_model: int, *, d_ff: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_ff = cfg.d_ff if d_ff is None else d_ff
        self.gated = cfg.activation in GATED_ACTIVATIONS
        self.activation = cfg.activation  # a name, so the module's static data stays hashable/comparable
        self.dtype = dtype
        kw = dict(bias=cfg.bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self.gated:
            self.gate_proj = dense(d_model, d_ff, ("embed", "mlp"), **kw)
        self.up_proj = dense(d_model, d_ff, ("embed", "mlp"), **kw)
        self.down_proj = dense(d_ff, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``(..., d_model)`` -> ``(..., d_model)`` in ``dtype``."""
        act = activation(self.activation)
        h = self.up_proj(x)
        h = act(self.gate_proj(x)) * h if self.gated else act(h)
        return self.down_proj(h)
