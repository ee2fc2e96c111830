"""Mamba-2 mixer: fused input projection, causal conv, SSD scan, gated grouped RMSNorm, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jamba_jax.config import Mamba2Config
from jamba_jax.layers.common import dense, param
from jamba_jax.layers.ssm_init import conv_init, dt_bias_init
from jamba_jax.ops import causal_conv1d, gated_rms_norm
from pallas_kernels.ssd import ssd


class Mamba2Mixer(nnx.Module):
    """``in_proj`` gives ``[z (d_inner) | xBC (conv_dim) | dt (n_heads)]``, as transformers and mamba_ssm.

    ``A_log``, ``D``, ``dt_bias`` and the norm weight stay float32 whatever ``param_dtype`` is.
    """

    def __init__(self, cfg: Mamba2Config, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, impl: str = "auto"):
        self.cfg, self.dtype, self.impl = cfg, dtype, impl
        h = cfg.n_heads
        self.in_proj = dense(d_model, cfg.d_inner + cfg.conv_dim + h, ("embed", "ssm_inner"), bias=cfg.proj_bias,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_weight = param(rngs, conv_init, (cfg.d_conv, cfg.conv_dim), ("conv_kernel", "ssm_inner"), param_dtype)
        self.conv_bias = (param(rngs, nnx.initializers.zeros_init(), (cfg.conv_dim,), ("ssm_inner",), param_dtype)
                          if cfg.conv_bias else None)
        self.A_log = param(None, lambda k, s, d: jnp.log(jnp.arange(1, h + 1, dtype=d)), (h,), ("ssm_heads",))
        self.D = param(None, nnx.initializers.ones_init(), (h,), ("ssm_heads",))
        self.dt_bias = param(rngs, dt_bias_init(), (h,), ("ssm_heads",))
        self.norm_weight = param(None, nnx.initializers.ones_init(), (cfg.d_inner,), ("ssm_inner",))
        self.out_proj = dense(cfg.d_inner, d_model, ("ssm_inner", "embed"), bias=cfg.proj_bias,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: ``(b, l, d_model)`` -> ``(b, l, d_model)``."""
        cfg = self.cfg
        b, l, _ = x.shape
        h, p, g, n = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z, xbc, dt = jnp.split(self.in_proj(x), [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
        xbc = jax.nn.silu(causal_conv1d(xbc, self.conv_weight[...].astype(xbc.dtype),
                                        None if self.conv_bias is None else self.conv_bias[...].astype(xbc.dtype),
                                        segment_ids=segment_ids))
        xs, B, C = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
        y = ssd(xs.reshape(b, l, h, p), dt, -jnp.exp(self.A_log[...]), B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                chunk_size=cfg.chunk_size, D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True,
                dt_limit=cfg.dt_limit, segment_ids=segment_ids, impl=self.impl)
        y = gated_rms_norm(y.reshape(b, l, cfg.d_inner), z, self.norm_weight[...],
                           group_size=cfg.d_inner // g, eps=cfg.norm_eps)
        return self.out_proj(y)
