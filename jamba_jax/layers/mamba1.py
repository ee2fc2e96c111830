"""Mamba-1 mixer (Mamba, FalconMamba, Jamba): projection, causal conv, selective scan, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jamba_jax.config import Mamba1Config
from jamba_jax.layers.common import dense, param, rms_normalize
from jamba_jax.layers.ssm_init import conv_init, dt_bias_init
from jamba_jax.ops import causal_conv1d
from pallas_kernels.selective_scan import selective_scan


class Mamba1Mixer(nnx.Module):
    """``in_proj`` gives ``[x | z]`` (``d_inner`` each); ``x_proj`` gives ``[dt (dt_rank) | B (n) | C (n)]``.

    With ``cfg.bcdt_norm`` dt, B and C are RMS-normalised before use (FalconMamba: no weights;
    Jamba: ``dt_norm``, ``B_norm``, ``C_norm`` weights).
    """

    def __init__(self, cfg: Mamba1Config, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, impl: str = "auto"):
        self.cfg, self.dtype, self.impl = cfg, dtype, impl
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = dense(d_model, 2 * d, ("embed", "ssm_inner"), bias=cfg.proj_bias, **kw)
        self.conv_weight = param(rngs, conv_init, (cfg.d_conv, d), ("conv_kernel", "ssm_inner"), param_dtype)
        self.conv_bias = (param(rngs, nnx.initializers.zeros_init(), (d,), ("ssm_inner",), param_dtype)
                          if cfg.conv_bias else None)
        self.x_proj = dense(d, r + 2 * n, ("ssm_inner", None), **kw)
        bound = r ** -0.5
        self.dt_proj = dense(r, d, ("dt_rank", "ssm_inner"), bias=True, **kw,
                             kernel_init=lambda k, s, t: jax.random.uniform(k, s, t, -bound, bound))
        self.dt_proj.bias = param(rngs, dt_bias_init(), (d,), ("ssm_inner",))
        self.A_log = param(None, lambda k, s, dt: jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=dt), s)),
                           (d, n), ("ssm_inner", "ssm_state"))
        self.D = param(None, nnx.initializers.ones_init(), (d,), ("ssm_inner",))
        if cfg.bcdt_norm == "weighted":
            self.dt_norm = param(None, nnx.initializers.ones_init(), (r,), ("dt_rank",))
            self.B_norm = param(None, nnx.initializers.ones_init(), (n,), ("ssm_state",))
            self.C_norm = param(None, nnx.initializers.ones_init(), (n,), ("ssm_state",))
        self.out_proj = dense(d, d_model, ("ssm_inner", "embed"), bias=cfg.proj_bias, **kw)

    def _norm(self, v: jax.Array, weight_name: str) -> jax.Array:
        out = rms_normalize(v, self.cfg.norm_eps)
        if self.cfg.bcdt_norm == "weighted":
            out = getattr(self, weight_name)[...] * out
        return out.astype(v.dtype)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: ``(b, l, d_model)`` -> ``(b, l, d_model)``."""
        cfg = self.cfg
        xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xs = jax.nn.silu(causal_conv1d(xs, self.conv_weight[...].astype(xs.dtype),
                                       None if self.conv_bias is None else self.conv_bias[...].astype(xs.dtype),
                                       segment_ids=segment_ids))
        dt, B, C = jnp.split(self.x_proj(xs), [cfg.dt_rank, cfg.dt_rank + cfg.d_state], axis=-1)
        if cfg.bcdt_norm is not None:
            dt, B, C = self._norm(dt, "dt_norm"), self._norm(B, "B_norm"), self._norm(C, "C_norm")
        delta = dt @ self.dt_proj.kernel[...].astype(dt.dtype)  # the bias goes in as delta_bias, in float32
        y = selective_scan(xs, delta, -jnp.exp(self.A_log[...]), B, C, D=self.D[...], z=z,
                           delta_bias=self.dt_proj.bias[...], delta_softplus=True,
                           segment_ids=segment_ids, impl=self.impl)
        return self.out_proj(y)
