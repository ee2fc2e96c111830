"""One decode step of the SSD recurrence, on one layer's state, updated in place.

    state' = exp(dt A) state + dt x B^T        y = state' C + D x

At large batch a Mamba-2 decode step is bound by moving the state: the 2.7B model at batch 64
holds 5.4 GB of bf16 state (10.7 GB float32) against 5.4 GB of weights, so every extra pass over
the state costs as much as the weights.  The backends:

* ``"xla"``: `ssd_step` in jnp, left to XLA's fusion (the CPU and TPU path; on a GPU it is not
  measured in this form, see BENCHMARKS.md).
* ``"pallas_gpu"``: one Triton program per (row, head) loads the (p, n) state once, updates it
  in registers, writes it back into the same buffer (``input_output_aliases``) and reduces ``y``
  from the registers: one read, one write.
* ``"auto"``: the kernel on GPUs (p, n powers of two), XLA elsewhere.

The math is float32 whatever the state's storage dtype (float32 or bfloat16, kept).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32
IMPLS = ("auto", "xla", "pallas_gpu")


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


def _kernel(state_ref, decay_ref, dtx_ref, B_ref, C_ref, y_ref, out_ref):
    """One (row, head): the (p, n) state read once, written once."""
    new = (decay_ref[...][:, None] * state_ref[...].astype(f32)
           + dtx_ref[...][:, None] * B_ref[...].astype(f32)[None, :])
    out_ref[...] = new.astype(out_ref.dtype)
    y_ref[...] = jnp.sum(new * C_ref[...].astype(f32)[None, :], axis=1)


def _pallas_update(state, x, dt, A, B, C, D, interpret=False):
    b, h, p, n = state.shape
    r = h // B.shape[1]
    decay = jnp.broadcast_to(jnp.exp(dt * A.astype(f32))[:, :, None], (b, h, p))
    dtx = dt[:, :, None] * x.astype(f32)
    row = pl.BlockSpec((None, None, p), lambda i, j: (i, j, 0))
    group = pl.BlockSpec((None, None, n), lambda i, j: (i, j // r, 0))
    state_spec = pl.BlockSpec((None, None, p, n), lambda i, j: (i, j, 0, 0))
    y_state, state = pl.pallas_call(
        _kernel, grid=(b, h), in_specs=[state_spec, row, row, group, group],
        out_specs=[row, state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, h, p), f32), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="ssd_decode_update",
    )(state, decay, dtx, B, C)
    return (y_state + _d_term(D, x.astype(f32))).astype(x.dtype), state


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def resolve_impl(impl: str, p: int, n: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"ssd_decode_update: impl={impl!r}, expected one of {IMPLS}")
    if impl == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        return "pallas_gpu" if on_gpu and _pow2(p) and _pow2(n) else "xla"
    return impl


def ssd_decode_update(state, x, dt, A, B, C, D=None, *, impl="auto", interpret=False):
    """`ssd_step` with the state kept in its dtype: returns ``(y (b, h, p) in x.dtype, new state
    (b, h, p, n) in state.dtype)``.

    state ``(b, h, p, n)`` float32 or bfloat16; other arguments as `ssd_step`.  Under ``jit``
    with the state donated (or carried through a loop) the kernel updates it in place.
    ``impl="pallas_gpu"`` needs p and n powers of two (Triton tiles); ``interpret=True`` runs it
    in Pallas' interpreter (CPU tests).
    """
    if resolve_impl(impl, x.shape[-1], B.shape[-1]) == "pallas_gpu":
        return _pallas_update(state, x, dt, A, B, C, D, interpret=interpret)
    y, new = ssd_step(state, x, dt, A, B, C, D)
    return y, new.astype(state.dtype)
