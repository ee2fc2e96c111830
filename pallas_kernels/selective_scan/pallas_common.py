"""Pieces shared by the two Pallas backends of the selective scan (``pallas_gpu``, ``pallas_tpu``).

Both backends follow one plan:

* **forward**: a grid over (batch, channel blocks); each program keeps its (n, d_block) float32
  state on chip and walks the sequence step by step.  Under differentiation the forward also
  writes the state at the start of every ``chunk`` steps ("checkpoints", b * ceil(l / chunk)
  states in all); per-step states never leave the chip.
* **backward**: the same grid, walking the chunks in reverse.  Each chunk restarts from its
  checkpoint, recomputes the chunk's states on chip, then runs the adjoint recurrence

      g_t = a_{t+1} * dh_{t+1}            (the gradient reaching h_t from the future)
      dh_t = g_t + C_t dy_t

  backwards through the chunk, producing every gradient in the same pass.
* the differentiable core is a ``jax.custom_vjp`` over arrays already in the backend's layout
  (``make_core``); layout changes, padding and the reduction of per-block partial sums
  happen outside the kernels in plain JAX.

Kernel math helpers here are written with primitives that both the Triton and the Mosaic
lowering accept (no ``jax.nn`` calls, which pull in ops the kernel lowerings lack).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """Which optional inputs and transforms a call has: static, they change the kernels."""
    softplus: bool
    has_D: bool
    has_z: bool
    has_bias: bool
    has_h0: bool
    has_keep: bool


# --------------------------------------------------------------------------- in-kernel math
def softplus(x):
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def gate_and_grad(z, sigmoid=sigmoid):
    """silu(z) and its derivative silu'(z) = s (1 + z (1 - s)), s = sigmoid(z) (a backend
    may pass its own sigmoid)."""
    s = sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))


def _log1p_over_x_coeffs(degree: int = 8) -> tuple[float, ...]:
    """Power-basis coefficients of the Chebyshev interpolant of log1p(e) / e on [0, 1].
    Degree 8 evaluated by float32 Horner is within 2.4e-7 relative of log1p(e) (e * P(e))
    over the whole interval (``test_gpu_fast_softplus_and_sigmoid_match_float64``)."""
    f = lambda e: np.log1p(e) / e            # Chebyshev nodes are interior: e > 0
    cheb = np.polynomial.Chebyshev.interpolate(f, degree, domain=[0.0, 1.0])
    return tuple(float(c) for c in cheb.convert(kind=np.polynomial.Polynomial).coef)


LOG1P_COEFFS = _log1p_over_x_coeffs()


def _horner(coeffs, x, fma):
    """sum_k coeffs[k] x^k (float32), highest power first: one fma per coefficient."""
    p = jnp.full(jnp.shape(x), coeffs[-1], f32)
    for c in coeffs[-2::-1]:
        p = fma(p, x, c)
    return p


def softplus_poly(x, exp2=jnp.exp2, fma=lambda a, b, c: a * b + c):
    """log(1 + e^x) = max(x, 0) + log1p(e), e = e^-|x| in (0, 1], with log1p(e) as e times
    the degree-8 polynomial above: one exp2 and ten multiply-adds, no log.  GPU backends
    pass their fastest exp2 and fused multiply-add."""
    e = exp2(jnp.abs(x) * -LOG2E)
    return fma(e, _horner(LOG1P_COEFFS, e, fma), jnp.maximum(x, 0.0))


def _exp2m1_over_x_coeffs(degree: int = 4) -> tuple[float, ...]:
    """Power-basis coefficients of the Chebyshev interpolant of (2^f - 1) / f on [-1/2, 1/2].
    2^f as 1 + f Q(f) is exactly 1 at f = 0, so decays near 1 (the common case) carry no
    bias that would build up along the sequence; degree 4 in float32 Horner is within
    3e-7 relative, about the GPU's ex2.approx (2^-22)."""
    def f(x):
        safe = np.where(x == 0.0, 1.0, x)             # an odd count of nodes includes 0
        return np.where(x == 0.0, LN2, np.expm1(safe * LN2) / safe)
    cheb = np.polynomial.Chebyshev.interpolate(f, degree, domain=[-0.5, 0.5])
    return tuple(float(c) for c in cheb.convert(kind=np.polynomial.Polynomial).coef)


EXP2M1_COEFFS = _exp2m1_over_x_coeffs()
_ROUNDER = 1.5 * 2.0**23     # x + _ROUNDER rounds x to an integer j, held in the low bits


def exp2_poly(x, fma=lambda a, b, c: a * b + c):
    """2^x on the multiply-add units, for kernels whose exponentials saturate the GPU's
    special-function unit (16 results per clock and SM against 128 multiply-adds).

    x = j + f with j = round(x), |f| <= 1/2: 2^f = 1 + f Q(f) with Q the polynomial above,
    then j is added to its exponent bits.  j comes from the rounding trick (x + 1.5 * 2^23
    holds j in its low mantissa bits; (bits << 23) leaves exactly j << 23), so there is no
    float-to-int conversion (that runs at the special-function rate too).  x is clamped to
    [-127, 127]: 2^-127 comes out as exactly 0 (its exponent field is 0), so x = -inf (a
    segment reset) gives 0; on (-127, -126) the result is a denormal below 2^-126 (flushed
    to 0 on the GPU), and from 127 on it is 2^127."""
    x = jnp.minimum(jnp.maximum(x, -127.0), 127.0)
    t = jax.lax.optimization_barrier(x + _ROUNDER)    # else XLA folds (x + R) - R into x
    f = x - (t - _ROUNDER)
    bits = (jax.lax.bitcast_convert_type(fma(f, _horner(EXP2M1_COEFFS, f, fma), 1.0), jnp.int32)
            + jax.lax.shift_left(jax.lax.bitcast_convert_type(t, jnp.int32), 23))
    return jax.lax.bitcast_convert_type(bits, f32)


# --------------------------------------------------------------------------- wrapper helpers
def keep_from_segments(segment_ids, b: int, l: int):
    """(b, l) float32: 0 where the state is reset (ids[t] != ids[t-1], t > 0), else 1.
    None when there are no segments (the kernels then skip the multiply)."""
    if segment_ids is None:
        return None
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.pad(starts, ((0, 0), (1, 0)), constant_values=False)
    return jax.lax.stop_gradient(1.0 - starts.astype(f32))


def largest_pow2_divisor(h: int, cap: int) -> int:
    """Largest power of two <= cap that divides h (1 if h is odd)."""
    block = 1
    while block * 2 <= cap and h % (block * 2) == 0:
        block *= 2
    return block


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def make_core(forward, backward):
    """Differentiable core ``core(cfg, *arrays) -> (y, final_state)`` from two kernel drivers.

    ``forward(cfg, arrays, save)`` returns (y, final_state, checkpoints or None);
    ``backward(cfg, arrays, checkpoints, dy, dfinal)`` returns one cotangent per array
    (None for absent optional arrays and for the non-differentiable segment mask).
    ``cfg`` is a hashable static description (shapes, flags, block sizes, interpret).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(cfg, *arrays):
        y, final, _ = forward(cfg, arrays, save=False)
        return y, final

    def core_fwd(cfg, *arrays):
        y, final, ckpt = forward(cfg, arrays, save=True)
        return (y, final), (arrays, ckpt)

    def core_bwd(cfg, residuals, cotangents):
        arrays, ckpt = residuals
        dy, dfinal = cotangents
        grads = backward(cfg, arrays, ckpt, dy, dfinal)
        return tuple(None if gr is None else _sum_over_replicas(gr, x) for gr, x in zip(grads, arrays))

    core.defvjp(core_fwd, core_bwd)
    return core


def grouped_partials_to_dBC(part, g: int):
    """Sum per-channel-block partials of dB / dC over the blocks of each group.

    part: float32 (b, nblk, l, n), the blocks of one group contiguous.  Returns (b, l, g, n)."""
    b, nblk = part.shape[:2]
    part = part.reshape(b, g, nblk // g, *part.shape[2:]).sum(axis=2)   # (b, g, l, n)
    return jnp.swapaxes(part, 1, 2)


def _varying(x) -> frozenset:
    """Manual mesh axes (inside jax.shard_map) along which x differs between devices."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)                    # jax >= 0.10
    return mat.varying if mat is not None else frozenset(getattr(aval, "vma", ()))


def _sum_over_replicas(grad, primal):
    """Inside shard_map, an input replicated along some mesh axes (A, D, bias over batch
    shards; B, C over channel shards) gets the sum of its per-device cotangents."""
    extra = _varying(grad) - _varying(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def out_struct(shape, dtype, inputs):
    """ShapeDtypeStruct for a kernel output that varies over the manual mesh axes of its
    inputs: inside ``jax.shard_map`` (check_vma) Pallas needs to be told."""
    varying = frozenset().union(*(_varying(x) for x in inputs if x is not None))
    try:
        if hasattr(jax.sharding, "ManualAxisType"):                  # jax >= 0.10
            return jax.ShapeDtypeStruct(
                shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
        return jax.ShapeDtypeStruct(shape, dtype, vma=varying)
    except TypeError:                                                # another jax: no vma
        return jax.ShapeDtypeStruct(shape, dtype)
