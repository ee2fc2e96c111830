"""Mamba-2 mixer: fused input projection, causal conv, SSD scan, gated grouped RMSNorm, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jamba_jax.cache import SSMCache, check_state_dtype, conv_step, conv_window
from jamba_jax.config import Mamba2Config, check_ssm_impl
from jamba_jax.layers.common import dense, param
from jamba_jax.layers.ssm_init import conv_init, dt_bias_init
from jamba_jax.ops import causal_conv1d, gated_rms_norm
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd.decode import ssd_decode_update
from pallas_kernels.ssd.reference import preprocess_dt


class Mamba2Mixer(nnx.Module):
    """``in_proj`` gives ``[z (d_inner) | xBC (conv_dim) | dt (n_heads)]``, as transformers and mamba_ssm.

    ``A_log``, ``D``, ``dt_bias`` and the norm weight stay float32 whatever ``param_dtype`` is.
    """

    def __init__(self, cfg: Mamba2Config, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, impl: str = "auto"):
        check_ssm_impl(impl)
        self.cfg, self.dtype, self.impl = cfg, dtype, impl
        # The decode step's state update (`ssd_decode_update`): the fused GPU kernel where there is
        # one, unless a pure-JAX scan path was asked for.
        self.decode_impl = "xla" if impl in ("xla", "reference") else "auto"
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

    # ------------------------------------------------------------------------- cached inference

    def prefill(self, x: jax.Array, lengths: jax.Array, *, state_dtype=jnp.float32) -> tuple[jax.Array, SSMCache]:
        """The forward pass of a right-padded batch plus the cache after each row's last real token.

        x ``(b, l, d_model)``; row ``i`` is real at ``t < lengths[i]`` (``1 <= lengths[i] <= l``).
        Outputs at real positions equal ``__call__``'s; padding positions get dt = 0 (decay 1, no
        input), so the final SSM state is the one after the row's own last token, and the conv
        window is cut at the same place. Returns ``(y (b, l, d_model), SSMCache)``: conv window
        ``(b, d_conv - 1, conv_dim)`` in the activation dtype, SSM state ``(b, n_heads, head_dim,
        d_state)`` computed in float32 and stored in ``state_dtype`` (float32 or bfloat16; bfloat16
        halves the bytes each decode step reads and writes, see `jamba_jax.cache`).
        """
        cfg = self.cfg
        b, l, _ = x.shape
        h, p, g, n = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z, xbc_in, dt = jnp.split(self.in_proj(x), [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
        bias = None if self.conv_bias is None else self.conv_bias[...].astype(xbc_in.dtype)
        xbc = jax.nn.silu(causal_conv1d(xbc_in, self.conv_weight[...].astype(xbc_in.dtype), bias))
        window = conv_window(xbc_in, lengths, cfg.d_conv)
        xs, B, C = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
        dt = preprocess_dt(dt, self.dt_bias[...], True, cfg.dt_limit)
        dt = jnp.where((jnp.arange(l)[None, :] < lengths[:, None])[..., None], dt, 0.0)
        y, state = ssd(xs.reshape(b, l, h, p), dt, -jnp.exp(self.A_log[...]), B.reshape(b, l, g, n),
                       C.reshape(b, l, g, n), chunk_size=cfg.chunk_size, D=self.D[...],
                       return_final_state=True, impl=self.impl)
        y = gated_rms_norm(y.reshape(b, l, cfg.d_inner), z, self.norm_weight[...],
                           group_size=cfg.d_inner // g, eps=cfg.norm_eps)
        return self.out_proj(y), SSMCache(window, state.astype(check_state_dtype(state_dtype)))

    def decode_step(self, x: jax.Array, cache: SSMCache) -> tuple[jax.Array, SSMCache]:
        """One token per row: x ``(b, 1, d_model)`` -> ``(y (b, 1, d_model), new cache)``.

        The update is computed in float32 whatever the cache holds and stored back in the cache's
        own dtype (``cache.ssm.dtype``: float32, or bfloat16 for a ``state_dtype=bfloat16`` cache).
        """
        cfg = self.cfg
        b = x.shape[0]
        h, p, g, n = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z, xbc, dt = jnp.split(self.in_proj(x[:, 0]), [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
        xbc, window = conv_step(cache.conv, xbc, self.conv_weight[...].astype(xbc.dtype),
                                None if self.conv_bias is None else self.conv_bias[...].astype(xbc.dtype))
        xs, B, C = jnp.split(jax.nn.silu(xbc), [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
        dt = preprocess_dt(dt, self.dt_bias[...], True, cfg.dt_limit)  # (b, h) float32
        xs = xs.reshape(b, h, p)
        y, ssm = ssd_decode_update(cache.ssm, xs, dt, -jnp.exp(self.A_log[...]), B.reshape(b, g, n),
                                   C.reshape(b, g, n), self.D[...], impl=self.decode_impl)
        y = gated_rms_norm(y.reshape(b, cfg.d_inner), z, self.norm_weight[...],
                           group_size=cfg.d_inner // g, eps=cfg.norm_eps)
        return self.out_proj(y)[:, None], SSMCache(window.astype(cache.conv.dtype), ssm)
