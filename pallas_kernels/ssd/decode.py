"""One decode step of the SSD recurrence, on one layer of a stacked state, updated in place.

    state' = exp(dt A) state + dt x B^T        y = state' C + D x

At large batch a Mamba-2 decode step is bound by moving the state: the 2.7B model at batch 64
holds 5.4 GB of bf16 state (10.7 GB float32) against 5.4 GB of weights, so every extra pass over
the state costs as much as the weights.  The backends differ only in bytes moved:

* ``"xla"``: jnp, fused by XLA.  XLA cannot fuse the read-out ``y`` with the in-place update, so
  the layer's state is read twice and written once (and the update is made to depend on ``y``,
  or XLA may order the read after the overwrite and copy the whole stack to keep the old one).
* ``"pallas_gpu"``: one Triton program per (row, head) loads the (p, n) state once, updates it
  in registers, writes it back into the same buffer (``input_output_aliases``) and reduces ``y``
  from the registers: one read, one write.
* ``"auto"``: the kernel on GPUs, XLA elsewhere; ``"reference"``: `ssd_step` on the slice.

The math is float32 whatever the state's storage dtype (float32 or bfloat16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32
IMPLS = ("auto", "xla", "pallas_gpu", "reference")


def ssd_step(state, x, dt, A, B, C, D=None):
    """The recurrence on one (unstacked) state: the reference.

    state ``(b, h, p, n)``; x ``(b, h, p)``; dt ``(b, h)`` float32, already biased / softplus-ed /
    clipped; A ``(h,)``; B, C ``(b, g, n)`` (head i reads group ``i // (h // g)``); D ``(h,)`` or
    ``(h, p)``.  Returns ``y (b, h, p)`` in x.dtype and the new state in float32.
    """
    h, g = x.shape[1], B.shape[1]
    Bh = jnp.repeat(B.astype(f32), h // g, axis=1)[:, :, None, :]     # (b, h, 1, n)
    Ch = jnp.repeat(C.astype(f32), h // g, axis=1)[:, :, None, :]
    xf = x.astype(f32)
    decay = jnp.exp(dt * A.astype(f32))[:, :, None, None]
    state = decay * state.astype(f32) + (dt[:, :, None] * xf)[..., None] * Bh
    y = jnp.sum(state * Ch, axis=-1)
    return (y + _d_term(D, xf)).astype(x.dtype), state


def _d_term(D, xf):
    if D is None:
        return 0.0
    D = D.astype(f32)
    return (D[:, None] if D.ndim == 1 else D) * xf


def _stacked(state, layer):
    """(R, b, h, p, n) view and layer index (int32 array) of a stacked or single state."""
    if layer is None:
        return state[None], jnp.zeros((), jnp.int32)
    return state, jnp.asarray(layer, jnp.int32)


def _unstacked(stack, layer):
    return stack[0] if layer is None else stack


def _xla_update(stack, layer, x, dt, A, B, C, D):
    h, g = x.shape[1], B.shape[1]
    old = jax.lax.dynamic_index_in_dim(stack, layer, 0, keepdims=False).astype(f32)
    Bh = jnp.repeat(B.astype(f32), h // g, axis=1)                    # (b, h, n)
    Ch = jnp.repeat(C.astype(f32), h // g, axis=1)
    decay = jnp.exp(dt * A.astype(f32))[:, :, None]                   # (b, h, 1)
    dtx = dt[:, :, None] * x.astype(f32)                                # (b, h, p)
    read_out = jnp.sum(old * Ch[:, :, None, :], axis=-1)               # old state . C
    y = decay * read_out + dtx * jnp.sum(Bh * Ch, axis=-1)[:, :, None] + _d_term(D, x.astype(f32))
    # "+ 0 * read_out" (not folded for floats) orders the read before the overwrite.
    new = decay[..., None] * old + dtx[..., None] * Bh[:, :, None, :] + 0.0 * read_out[..., None]
    stack = jax.lax.dynamic_update_index_in_dim(stack, new.astype(stack.dtype), layer, 0)
    return y.astype(x.dtype), stack


def _kernel(layer_ref, state_ref, decay_ref, dtx_ref, B_ref, C_ref, y_ref, out_ref):
    """One (row, head): state (p, n) of layer ``layer_ref[0]`` read once, written once."""
    layer = layer_ref[0]
    old = state_ref[layer].astype(f32)
    new = (decay_ref[...][:, None] * old
           + dtx_ref[...][:, None] * B_ref[...].astype(f32)[None, :])
    out_ref[layer] = new.astype(out_ref.dtype)
    y_ref[...] = jnp.sum(new * C_ref[...].astype(f32)[None, :], axis=1)


def _pallas_update(stack, layer, x, dt, A, B, C, D, interpret=False):
    R, b, h, p, n = stack.shape
    g = B.shape[1]
    r = h // g
    decay = jnp.broadcast_to(jnp.exp(dt * A.astype(f32))[:, :, None], (b, h, p))
    dtx = dt[:, :, None] * x.astype(f32)
    row = lambda i, j: (i, j, 0)
    state_spec = pl.BlockSpec((R, None, None, p, n), lambda i, j: (0, i, j, 0, 0))
    y_state, stack = pl.pallas_call(
        _kernel, grid=(b, h),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), state_spec,
                  pl.BlockSpec((None, None, p), row), pl.BlockSpec((None, None, p), row),
                  pl.BlockSpec((None, None, n), lambda i, j: (i, j // r, 0)),
                  pl.BlockSpec((None, None, n), lambda i, j: (i, j // r, 0))],
        out_specs=[pl.BlockSpec((None, None, p), row), state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, h, p), f32), jax.ShapeDtypeStruct(stack.shape, stack.dtype)],
        input_output_aliases={1: 1},
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="ssd_decode_update",
    )(layer.reshape(1), stack, decay, dtx, B, C)
    return (y_state + _d_term(D, x.astype(f32))).astype(x.dtype), stack


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def resolve_impl(impl: str, p: int, n: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"ssd_decode_update: impl={impl!r}, expected one of {IMPLS}")
    if impl == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        return "pallas_gpu" if on_gpu and _pow2(p) and _pow2(n) else "xla"
    return impl


def ssd_decode_update(state, layer, x, dt, A, B, C, D=None, *, impl="auto", interpret=False):
    """`ssd_step` on ``state[layer]``: returns ``(y (b, h, p) in x.dtype, state with that entry
    replaced)``.

    state ``(R, b, h, p, n)`` stacked over layers (``layer``: int or traced int32) or ``(b, h, p,
    n)`` with ``layer=None``, float32 or bfloat16 (kept); other arguments as `ssd_step`.  Under
    ``jit`` with the state donated (or carried through a loop) the update happens in place.
    ``impl="pallas_gpu"`` needs p and n powers of two (Triton tiles); ``interpret=True`` runs it
    in Pallas' interpreter (CPU tests).
    """
    impl = resolve_impl(impl, x.shape[-1], B.shape[-1])
    stack, idx = _stacked(state, layer)
    if impl == "reference":
        y, new = ssd_step(stack[idx], x, dt, A, B, C, D)
        return y, _unstacked(stack.at[idx].set(new.astype(stack.dtype)), layer)
    update = _xla_update if impl == "xla" else functools.partial(_pallas_update, interpret=interpret)
    y, stack = update(stack, idx, x, dt, A, B, C, D)
    return y, _unstacked(stack, layer)
