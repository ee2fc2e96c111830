"""The single-step SSD update of cached decoding (`pallas_kernels.ssd.decode`): the XLA path and the
GPU kernel (in Pallas' interpreter) against the reference recurrence `ssd_step`, step after step with
the state carried through a ``lax.scan`` (the token loop's pattern); float32 and bfloat16 state;
1 < n_groups < n_heads; D per head and per channel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd.decode import resolve_impl, ssd_decode_update, ssd_step
from tests.helpers import rel_l2

STEPS = 3


def make_inputs(seed, *, b=2, h=4, p=16, n=32, g=2, state_dtype=jnp.float32, x_dtype=jnp.bfloat16, D_shape="h"):
    """A random state and ``STEPS`` steps of inputs (leading axis)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(
        state=jnp.asarray(f(b, h, p, n), state_dtype),
        x=jnp.asarray(f(STEPS, b, h, p), x_dtype),
        dt=jnp.asarray(rng.uniform(0.01, 0.3, (STEPS, b, h)), jnp.float32),
        A=-jnp.asarray(rng.uniform(1.0, 8.0, (h,)), jnp.float32),
        B=jnp.asarray(f(STEPS, b, g, n), x_dtype),
        C=jnp.asarray(f(STEPS, b, g, n), x_dtype),
        D=jnp.asarray(f(h) if D_shape == "h" else f(h, p), jnp.float32),
    )


def run_steps(update, inp):
    """Carry the state through ``STEPS`` updates in a jitted ``lax.scan``: (ys, final state)."""
    def step(state, xs):
        x, dt, B, C = xs
        y, state = update(state, x, dt, inp["A"], B, C, inp["D"])
        return state, y
    state, ys = jax.jit(lambda s: jax.lax.scan(step, s, (inp["x"], inp["dt"], inp["B"], inp["C"])))(inp["state"])
    return ys, state


def reference(inp):
    """``ssd_step`` with the state rounded to its storage dtype after every step, as stored."""
    def update(state, *args):
        y, new = ssd_step(state, *args)
        return y, new.astype(state.dtype)
    return run_steps(update, inp)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_over_steps(impl, state_dtype):
    """bf16 activations, D (h, p): y within 1e-2 (it is bf16), the state within 1e-6 (float32
    state: the same float32 arithmetic) or 1e-2 (bfloat16 state), dtype kept."""
    inp = make_inputs(0, state_dtype=state_dtype, D_shape="hp")
    update = lambda *a: ssd_decode_update(*a, impl=impl, interpret=True)
    ys, state = run_steps(update, inp)
    ys_ref, state_ref = reference(inp)
    assert state.dtype == state_dtype and ys.dtype == jnp.bfloat16
    assert rel_l2(ys.astype(jnp.float32), ys_ref.astype(jnp.float32)) < 1e-2
    tol = 1e-6 if state_dtype == jnp.float32 else 1e-2
    assert rel_l2(state.astype(jnp.float32), state_ref.astype(jnp.float32)) < tol


def test_kernel_float32_exact():
    """float32 throughout, g = 1, D (h,): the kernel within 1e-6 of the reference in y and state."""
    inp = make_inputs(1, g=1, x_dtype=jnp.float32)
    ys, state = run_steps(lambda *a: ssd_decode_update(*a, impl="pallas_gpu", interpret=True), inp)
    ys_ref, state_ref = reference(inp)
    assert rel_l2(ys, ys_ref) < 1e-6
    assert rel_l2(state, state_ref) < 1e-6


def test_auto_is_xla_on_cpu_and_bad_impl_raises():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto", 64, 128) == "xla"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("triton", 64, 128)
