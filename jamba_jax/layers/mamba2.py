"""Mamba-2 mixer: fused input projection, causal conv, SSD scan, gated grouped RMSNorm, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jamba_jax.cache import SSMCache, check_state_dtype, conv_step, conv_window, layer_slice, layer_update
from jamba_jax.config import Mamba2Config
from jamba_jax.layers.common import dense, param
from jamba_jax.layers.ssm_init import conv_init, dt_bias_init
from jamba_jax.ops import causal_conv1d, gated_rms_norm
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd.reference import preprocess_dt


def ssd_step(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             D: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One step of the SSD recurrence (the decode counterpart of ``pallas_kernels.ssd.ssd``).

    state ``(b, h, p, n)`` float32; x ``(b, h, p)``; dt ``(b, h)`` *already* biased / softplus-ed /
    clipped (float32); A ``(h,)``; B, C ``(b, g, n)`` (head i reads group ``i // (h // g)``); D
    ``(h,)`` or ``(h, p)``. ``state' = exp(dt A) state + dt x B^T``, ``y = state' C + D x``.
    Returns ``y (b, h, p)`` in x.dtype and the new state (float32).
    """
    f32 = jnp.float32
    h, g = x.shape[1], B.shape[1]
    Bh = jnp.repeat(B.astype(f32), h // g, axis=1)[:, :, None, :]  # (b, h, 1, n)
    Ch = jnp.repeat(C.astype(f32), h // g, axis=1)[:, :, None, :]
    xf = x.astype(f32)
    decay = jnp.exp(dt * A.astype(f32))[:, :, None, None]
    state = decay * state.astype(f32) + (dt[:, :, None] * xf)[..., None] * Bh
    y = jnp.sum(state * Ch, axis=-1)  # (b, h, p); a fused reduce, no second pass over the state
    if D is not None:
        D = D.astype(f32)
        y = y + (D[:, None] if D.ndim == 1 else D) * xf
    return y.astype(x.dtype), state


def ssd_decode_update(ssm: jax.Array, layer, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                      D: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`ssd_step` on entry ``layer`` of a stacked state, updated in place: ``(y, ssm with ssm[layer] = state')``.

    ssm ``(repeats, b, h, p, n)`` (``layer=None``: ``(b, h, p, n)``) in its storage dtype (float32
    or bfloat16); other arguments as `ssd_step`. The math is float32 throughout; the new state is
    rounded to ``ssm.dtype`` only when stored.

    Bytes: the layer's state is read twice and written once. y comes from the *old* state,
    ``y = exp(dt A) (state C) + dt x (B . C) + D x`` (equal to ``state' C + D x``), in a reduction
    that XLA cannot fuse with the in-place update, so the update is made to consume y (``+ 0 * y``,
    which XLA does not fold for floats). That data dependency orders the read of the old entry
    before its overwrite; without it XLA may schedule them either way and copies the whole stacked
    array (every layer, every token) to keep the old one. See the notes in `jamba_jax.cache`.
    """
    f32 = jnp.float32
    h, g = x.shape[1], B.shape[1]
    old = layer_slice(ssm, layer).astype(f32)
    Bh = jnp.repeat(B.astype(f32), h // g, axis=1)  # (b, h, n)
    Ch = jnp.repeat(C.astype(f32), h // g, axis=1)
    decay = jnp.exp(dt * A.astype(f32))  # (b, h)
    dtx = dt[:, :, None] * x.astype(f32)  # (b, h, p)
    sc = jnp.sum(old * Ch[:, :, None, :], axis=-1)  # (b, h, p): the old state read out
    y = decay[:, :, None] * sc + dtx * jnp.sum(Bh * Ch, axis=-1)[:, :, None]
    if D is not None:
        D = D.astype(f32)
        y = y + (D[:, None] if D.ndim == 1 else D) * x.astype(f32)
    new = decay[:, :, None, None] * old + dtx[..., None] * Bh[:, :, None, :] + 0.0 * sc[..., None]
    return y.astype(x.dtype), layer_update(ssm, new, layer)


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

    def decode_step(self, x: jax.Array, cache: SSMCache, *, layer=None) -> tuple[jax.Array, SSMCache]:
        """One token per row: x ``(b, 1, d_model)`` -> ``(y (b, 1, d_model), new cache)``.

        With ``layer`` (an int or traced index) the cache arrays carry a leading stacked axis: the
        step reads ``cache[layer]`` and returns the stacked arrays with that entry replaced.
        The update is computed in float32 whatever the cache holds and stored back in the cache's
        own dtype (``cache.ssm.dtype``: float32, or bfloat16 for a ``state_dtype=bfloat16`` cache).
        """
        cfg = self.cfg
        b = x.shape[0]
        h, p, g, n = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z, xbc, dt = jnp.split(self.in_proj(x[:, 0]), [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
        xbc, window = conv_step(layer_slice(cache.conv, layer), xbc, self.conv_weight[...].astype(xbc.dtype),
                                None if self.conv_bias is None else self.conv_bias[...].astype(xbc.dtype))
        xs, B, C = jnp.split(jax.nn.silu(xbc), [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
        dt = preprocess_dt(dt, self.dt_bias[...], True, cfg.dt_limit)  # (b, h) float32
        xs = xs.reshape(b, h, p)
        y, ssm = ssd_decode_update(cache.ssm, layer, xs, dt, -jnp.exp(self.A_log[...]), B.reshape(b, g, n),
                                   C.reshape(b, g, n), self.D[...])
        y = gated_rms_norm(y.reshape(b, cfg.d_inner), z, self.norm_weight[...],
                           group_size=cfg.d_inner // g, eps=cfg.norm_eps)
        return self.out_proj(y)[:, None], SSMCache(layer_update(cache.conv, window, layer), ssm)
