"""Public entry point of the Mamba-1 selective scan: argument checks and backend dispatch.

Every backend has the signature of ``selective_scan_reference`` (see ``reference.py``) and
returns ``(y, final_state)``.  To add one, register it in ``_BACKENDS``.  ``impl="auto"``
picks the Pallas kernel of the default device (GPU: Triton, TPU: Mosaic) and the chunked XLA
scan on CPU; ``impl="pallas"`` picks the kernel of the default device, or with
``interpret=True`` runs the GPU kernel in Pallas' interpreter anywhere (CPU tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .pallas_gpu import selective_scan_pallas_gpu
from .pallas_tpu import selective_scan_pallas_tpu
from .reference import selective_scan_reference
from .xla import selective_scan_xla

_BACKENDS = {
    "reference": selective_scan_reference,
    "xla": selective_scan_xla,
    "pallas_gpu": selective_scan_pallas_gpu,
    "pallas_tpu": selective_scan_pallas_tpu,
}
_PALLAS = ("pallas_gpu", "pallas_tpu")
_GPU_PLATFORMS = ("gpu", "cuda")   # the Triton lowering targets NVIDIA GPUs


def _auto_impl() -> str:
    platform = jax.default_backend()
    if platform in _GPU_PLATFORMS:
        return "pallas_gpu"
    if platform == "tpu":
        return "pallas_tpu"
    return "xla"


def _pallas_impl(interpret: bool) -> str:
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in _GPU_PLATFORMS or interpret:
        return "pallas_gpu"
    raise ValueError(
        f'selective_scan: impl="pallas" has no kernel for the {platform!r} backend; '
        'pass interpret=True to run a kernel in the Pallas interpreter, or use impl="xla"'
    )


def _check_shape(name: str, x, expected: tuple, letters: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"selective_scan: {name} must have shape {letters} = {tuple(expected)}, "
            f"found {tuple(x.shape)}"
        )


def _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids) -> None:
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must have shape (b, l, d), found {tuple(u.shape)}")
    b, l, d = u.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must have shape (d, n) with d = {d}, found {tuple(A.shape)}")
    if jnp.iscomplexobj(A):
        raise ValueError("selective_scan: A must be real (complex A is not supported)")
    n = A.shape[1]
    _check_shape("delta", delta, (b, l, d), "(b, l, d)")
    if B.ndim == 3:
        _check_shape("B", B, (b, l, n), "(b, l, n)")
    elif B.ndim == 4:
        g = B.shape[2]
        if g < 1 or d % g:
            raise ValueError(
                f"selective_scan: B of shape (b, l, g, n) needs g dividing d = {d}, found {tuple(B.shape)}"
            )
        _check_shape("B", B, (b, l, g, n), "(b, l, g, n)")
    else:
        raise ValueError(
            f"selective_scan: B must have shape (b, l, n) = {(b, l, n)} or (b, l, g, n), found {tuple(B.shape)}"
        )
    _check_shape("C", C, B.shape, "B's shape")
    if D is not None:
        _check_shape("D", D, (d,), "(d,)")
    if delta_bias is not None:
        _check_shape("delta_bias", delta_bias, (d,), "(d,)")
    if z is not None:
        _check_shape("z", z, (b, l, d), "(b, l, d)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, d, n), "(b, d, n)")
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, (b, l), "(b, l)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"selective_scan: segment_ids must be integer, found dtype {segment_ids.dtype}")


def selective_scan(
    u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, segment_ids=None, return_final_state=False, impl="auto",
    interpret=False,
):
    """Mamba-1 selective scan (mamba_ssm's ``selective_scan_fn``, channels last).

        delta   = softplus(delta + delta_bias)          (bias / softplus optional), float32
        state_t = exp(delta_t A) * state_{t-1} + delta_t B_t u_t       state: (b, d, n)
        y_t     = (sum_n state_t C_t + D u_t) * silu(z_t)              (D / z optional)

    Args:
      u: (b, l, d) input.   delta: (b, l, d) time steps (before bias / softplus).
      A: (d, n) negative reals.   B, C: (b, l, n), or (b, l, g, n) with g dividing d
        (channel i uses group i // (d // g)); B and C must have the same shape.
      D: (d,) skip.   z: (b, l, d) gate.   delta_bias: (d,).
      delta_softplus: apply softplus to delta (+ bias).
      initial_state: (b, d, n) state before each row's first step (zeros if None).
      segment_ids: (b, l) int; the state is reset to zero where ids[t] != ids[t-1]
        (packed documents).  initial_state therefore only reaches the first segment.
      return_final_state: also return the float32 (b, d, n) state after each row's last step.
      impl: "auto" | "reference" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu".  "auto"
        is the Pallas kernel on GPU / TPU and "xla" elsewhere; "pallas" is the kernel of
        the default device (the GPU kernel when interpreting on CPU).
      interpret: run a Pallas backend in Pallas' interpreter (any device; for tests).
        Ignored by the "reference" and "xla" backends.

    Returns:
      y: (b, l, d) in u's dtype, or (y, final_state) if return_final_state.
    """
    if impl == "auto":
        impl = _auto_impl()
    elif impl == "pallas":
        impl = _pallas_impl(interpret)
    if impl not in _BACKENDS:
        raise ValueError(
            f"selective_scan: impl must be one of {['auto', 'pallas', *_BACKENDS]}, found {impl!r}"
        )
    u, delta, A, B, C = map(jnp.asarray, (u, delta, A, B, C))
    D, z, delta_bias, initial_state, segment_ids = (
        None if a is None else jnp.asarray(a) for a in (D, z, delta_bias, initial_state, segment_ids))
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    extra = dict(interpret=interpret) if impl in _PALLAS else {}
    y, final_state = _BACKENDS[impl](
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, segment_ids=segment_ids, **extra,
    )
    return (y, final_state) if return_final_state else y
