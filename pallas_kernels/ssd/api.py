"""Public entry point of the Mamba-2 SSD op: argument checks and backend dispatch.

Every backend is a function with the signature of
:func:`pallas_kernels.ssd.reference.ssd_reference`::

    fn(x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
       initial_state, segment_ids) -> (y, final_state)

receiving already-validated arguments and always returning the final state.
Backends are imported lazily, so adding one is a single entry in ``_BACKENDS``.

``impl="auto"`` picks the Pallas kernel of the default device's platform (Triton
on GPUs, Mosaic on TPUs) and the chunked XLA path elsewhere (CPU); ``"pallas"``
picks the Pallas backend by platform (on CPU only with ``interpret=True``, where
it runs the GPU kernels in Pallas' interpreter).
"""
from __future__ import annotations

import importlib
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.reference import DEFAULT_DT_LIMIT

# impl name -> "module:function".
_BACKENDS = {
    "reference": "pallas_kernels.ssd.reference:ssd_reference",
    "xla": "pallas_kernels.ssd.xla:ssd_xla",
    "pallas_gpu": "pallas_kernels.ssd.pallas_gpu:ssd_pallas_gpu",
    "pallas_tpu": "pallas_kernels.ssd.pallas_tpu:ssd_pallas_tpu",
}
_PALLAS = ("pallas_gpu", "pallas_tpu")


def _platform() -> str:
    return jax.default_backend()


def _pallas_impl(interpret: bool) -> str | None:
    """The Pallas backend for the default platform (None if it has none)."""
    platform = _platform()
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    if platform == "tpu":
        return "pallas_tpu"
    return "pallas_gpu" if interpret else None


def _auto_impl() -> str:
    """The backend used by ``impl="auto"``: the Pallas kernel on GPU/TPU, XLA elsewhere."""
    return _pallas_impl(interpret=False) or "xla"


def _resolve_impl(impl: str, interpret: bool) -> str:
    if impl == "auto":
        return _auto_impl()
    if impl == "pallas":
        resolved = _pallas_impl(interpret)
        if resolved is None:
            raise ValueError(
                f"ssd: impl='pallas' has no kernel for platform {_platform()!r}; pass "
                "interpret=True (runs the GPU kernels in Pallas' interpreter) or impl='xla'")
        return resolved
    if impl not in _BACKENDS:
        raise ValueError(
            f"ssd: argument 'impl' expected one of {['auto', 'pallas', *_BACKENDS]}, "
            f"found {impl!r}")
    return impl


def _load_backend(impl: str):
    module, name = _BACKENDS[impl].split(":")
    return getattr(importlib.import_module(module), name)


def _check_shape(name, array, expected, symbols):
    """Raise a ValueError naming the argument if ``array.shape != expected``."""
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"ssd: argument '{name}' expected shape {symbols} = {tuple(expected)}, "
            f"found {tuple(array.shape)}")


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_state, segment_ids):
    if x.ndim != 4:
        raise ValueError(f"ssd: argument 'x' expected shape (b, l, h, p), found {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.ndim != 4 or tuple(B.shape[:2]) != (b, l):
        raise ValueError(
            f"ssd: argument 'B' expected shape (b, l, g, n) = ({b}, {l}, g, n), "
            f"found {tuple(B.shape)}")
    g, n = B.shape[2:]
    if g == 0 or h % g != 0:
        raise ValueError(
            f"ssd: argument 'B' expected a group count g dividing h = {h}, found g = {g} "
            f"(shape {tuple(B.shape)})")
    _check_shape("dt", dt, (b, l, h), "(b, l, h)")
    _check_shape("A", A, (h,), "(h,)")
    _check_shape("C", C, (b, l, g, n), "(b, l, g, n)")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(
            f"ssd: argument 'D' expected shape (h,) = {(h,)} or (h, p) = {(h, p)}, "
            f"found {tuple(D.shape)}")
    if z is not None:
        _check_shape("z", z, (b, l, h, p), "(b, l, h, p)")
    if dt_bias is not None:
        _check_shape("dt_bias", dt_bias, (h,), "(h,)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, h, p, n), "(b, h, p, n)")
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, (b, l), "(b, l)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"ssd: argument 'segment_ids' expected an integer dtype, found {segment_ids.dtype}")
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"ssd: argument 'chunk_size' expected a positive int, found {chunk_size!r}")
    if dt_limit is None or len(tuple(dt_limit)) != 2:
        raise ValueError(f"ssd: argument 'dt_limit' expected a pair (min, max), found {dt_limit!r}")


def ssd(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=DEFAULT_DT_LIMIT, initial_state=None, segment_ids=None,
        return_final_state=False, impl="auto", interpret=False):
    """Mamba-2 SSD scan (semantics of mamba_ssm's ``mamba_chunk_scan_combined``, channels last).

    Args:
      x: (b, l, h, p) inputs.
      dt: (b, l, h) time steps (before ``dt_bias`` / softplus / clipping).
      A: (h,) negative reals; the per-step decay is ``exp(dt * A)``.
      B, C: (b, l, g, n) input / output projections; head i uses group i // (h // g).
      chunk_size: chunk length Q of the chunked algorithm (any ``l`` is allowed).
      D: optional (h,) or (h, p) skip connection, ``y += D * x``.
      z: optional (b, l, h, p) gate, ``y *= silu(z)`` (applied after D).
      dt_bias: optional (h,), added to dt before the softplus.
      dt_softplus: apply softplus to dt (after ``dt_bias``).
      dt_limit: (min, max) clip of dt after softplus; skipped for the default (0, inf).
      initial_state: optional (b, h, p, n) state before position 0 (belongs to the
        first segment only).
      segment_ids: optional (b, l) integers; the state is reset to zero at every
        position whose id differs from the previous position's id.
      return_final_state: also return the state after the last position.
      impl: "auto" | "pallas" | "pallas_gpu" | "pallas_tpu" | "xla" | "reference".
      interpret: run a Pallas backend in Pallas' interpreter (CPU tests); ignored by
        the others.

    Returns:
      y (b, l, h, p) in x.dtype, or (y, final_state (b, h, p, n) float32) with
      ``return_final_state=True``.  The state and all decay math are float32.
    """
    x, dt, A, B, C = map(jnp.asarray, (x, dt, A, B, C))
    D, z, dt_bias, initial_state, segment_ids = (
        None if a is None else jnp.asarray(a) for a in (D, z, dt_bias, initial_state, segment_ids))
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_state, segment_ids)
    impl = _resolve_impl(impl, interpret)
    backend = _load_backend(impl)
    dt_limit = tuple(float(v) for v in dt_limit)
    chunk_size = int(chunk_size)           # a numpy integer from a sweep is a static int here
    extra = {"interpret": bool(interpret)} if impl in _PALLAS else {}
    y, final_state = backend(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
        segment_ids=segment_ids, **extra)
    return (y, final_state) if return_final_state else y
