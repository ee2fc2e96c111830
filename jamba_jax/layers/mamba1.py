"""Mamba-1 mixer (Mamba, FalconMamba, Jamba): projection, causal conv, selective scan, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jamba_jax.cache import SSMCache, check_state_dtype, conv_step, conv_window
from jamba_jax.config import Mamba1Config, check_ssm_impl
from jamba_jax.layers.common import dense, param, rms_normalize
from jamba_jax.layers.ssm_init import conv_init, dt_bias_init
from jamba_jax.ops import causal_conv1d
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan.reference import prepare_delta


def selective_scan_step(state: jax.Array, u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                        C: jax.Array, D: jax.Array | None = None, z: jax.Array | None = None):
    """One step of the selective scan (the decode counterpart of ``selective_scan``).

    state ``(b, d, n)`` (float32, or bfloat16: computed in float32); u ``(b, d)``; delta ``(b, d)``
    *already* biased / softplus-ed (float32); A ``(d, n)``; B, C ``(b, n)``; D ``(d,)``; z ``(b, d)``.
    ``state' = exp(delta A) state + delta u B``, ``y = (state' C + D u) silu(z)``.
    Returns ``y (b, d)`` in u.dtype and the new state (float32).
    """
    f32 = jnp.float32
    uf = u.astype(f32)
    state = (jnp.exp(delta[..., None] * A.astype(f32)) * state.astype(f32)
             + (delta * uf)[..., None] * B.astype(f32)[:, None, :])
    y = jnp.sum(state * C.astype(f32)[:, None, :], axis=-1)
    if D is not None:
        y = y + D.astype(f32) * uf
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(u.dtype), state


class Mamba1Mixer(nnx.Module):
    """``in_proj`` gives ``[x | z]`` (``d_inner`` each); ``x_proj`` gives ``[dt (dt_rank) | B (n) | C (n)]``.

    With ``cfg.bcdt_norm`` dt, B and C are RMS-normalised before use (FalconMamba: no weights;
    Jamba: ``dt_norm``, ``B_norm``, ``C_norm`` weights).
    """

    def __init__(self, cfg: Mamba1Config, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, impl: str = "auto"):
        check_ssm_impl(impl)
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

    # ------------------------------------------------------------------------- cached inference

    def _conv_params(self, dtype):
        return (self.conv_weight[...].astype(dtype),
                None if self.conv_bias is None else self.conv_bias[...].astype(dtype))

    def _dt_bc(self, xs: jax.Array):
        """conv output -> (delta before bias/softplus, B, C), norms applied."""
        cfg = self.cfg
        dt, B, C = jnp.split(self.x_proj(xs), [cfg.dt_rank, cfg.dt_rank + cfg.d_state], axis=-1)
        if cfg.bcdt_norm is not None:
            dt, B, C = self._norm(dt, "dt_norm"), self._norm(B, "B_norm"), self._norm(C, "C_norm")
        return dt @ self.dt_proj.kernel[...].astype(dt.dtype), B, C

    def prefill(self, x: jax.Array, lengths: jax.Array, *, state_dtype=jnp.float32) -> tuple[jax.Array, SSMCache]:
        """The forward pass of a right-padded batch plus the cache after each row's last real token.

        x ``(b, l, d_model)``; row ``i`` is real at ``t < lengths[i]``. Padding positions get
        delta = 0 (no decay, no input), so the final state is the one after the row's own last
        token; the conv window is cut at the same place. Returns ``(y (b, l, d_model), SSMCache)``:
        conv window ``(b, d_conv - 1, d_inner)`` in the activation dtype, SSM state ``(b, d_inner,
        d_state)`` computed in float32 and stored in ``state_dtype`` (float32 or bfloat16).
        """
        l = x.shape[1]
        xs_in, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xs = jax.nn.silu(causal_conv1d(xs_in, *self._conv_params(xs_in.dtype)))
        window = conv_window(xs_in, lengths, self.cfg.d_conv)
        delta, B, C = self._dt_bc(xs)
        delta = prepare_delta(delta, self.dt_proj.bias[...], True)
        delta = jnp.where((jnp.arange(l)[None, :] < lengths[:, None])[..., None], delta, 0.0)
        y, state = selective_scan(xs, delta, -jnp.exp(self.A_log[...]), B, C, D=self.D[...], z=z,
                                  return_final_state=True, impl=self.impl)
        return self.out_proj(y), SSMCache(window, state.astype(check_state_dtype(state_dtype)))

    def decode_step(self, x: jax.Array, cache: SSMCache) -> tuple[jax.Array, SSMCache]:
        """One token per row: x ``(b, 1, d_model)`` -> ``(y (b, 1, d_model), new cache)``.

        The update is computed in float32 and stored in the cache's dtype (``cache.ssm.dtype``).
        """
        xs, z = jnp.split(self.in_proj(x[:, 0]), 2, axis=-1)
        xs, window = conv_step(cache.conv, xs, *self._conv_params(xs.dtype))
        xs = jax.nn.silu(xs)
        delta, B, C = self._dt_bc(xs)
        delta = prepare_delta(delta, self.dt_proj.bias[...], True)
        y, ssm = selective_scan_step(cache.ssm, xs, delta, -jnp.exp(self.A_log[...]), B, C, self.D[...], z)
        return self.out_proj(y)[:, None], SSMCache(window.astype(cache.conv.dtype), ssm.astype(cache.ssm.dtype))
