"""The single-step SSD update of cached decoding (`pallas_kernels.ssd.decode`): the XLA path and the
GPU kernel (in Pallas' interpreter) against the reference recurrence `ssd_step`, on a stacked state
with a traced layer index (as in the decode loop's layer scan) and on a single state; float32 and
bfloat16 state; n_groups 1 < g < h."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd.decode import ssd_decode_update, ssd_step
from tests.helpers import rel_l2


def make_inputs(seed, *, R=3, b=2, h=4, p=16, n=32, g=2, state_dtype=jnp.float32, D_shape="h"):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(
        state=jnp.asarray(f(R, b, h, p, n), state_dtype),
        x=jnp.asarray(f(b, h, p), jnp.bfloat16),
        dt=jnp.asarray(rng.uniform(0.01, 0.3, (b, h)), jnp.float32),
        A=-jnp.asarray(rng.uniform(1.0, 8.0, (h,)), jnp.float32),
        B=jnp.asarray(f(b, g, n), jnp.bfloat16),
        C=jnp.asarray(f(b, g, n), jnp.bfloat16),
        D=jnp.asarray(f(h) if D_shape == "h" else f(h, p), jnp.float32),
    )


def expected(inp, layer):
    """y and the whole stack after updating entry ``layer`` with the reference recurrence."""
    y, new = ssd_step(inp["state"][layer], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"])
    return y, inp["state"].at[layer].set(new.astype(inp["state"].dtype))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_update_in_a_layer_scan(impl, state_dtype):
    """Every layer of the stack updated in turn by a ``lax.scan`` with the stack in the carry (the
    decode loop's pattern): each step's y and the final stack match the reference."""
    inp = make_inputs(0, state_dtype=state_dtype, D_shape="hp")
    R = inp["state"].shape[0]

    @jax.jit
    def run(stack):
        def step(stack, layer):
            y, stack = ssd_decode_update(stack, layer, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                         inp["D"], impl=impl, interpret=True)
            return stack, y
        return jax.lax.scan(step, stack, jnp.arange(R))

    stack, ys = run(inp["state"])
    ref = dict(inp)
    for layer in range(R):
        y_ref, ref["state"] = expected(ref, layer)
        assert rel_l2(ys[layer].astype(jnp.float32), y_ref.astype(jnp.float32)) < 1e-2  # y is bf16 (x.dtype)
    assert stack.dtype == state_dtype
    tol = 1e-6 if state_dtype == jnp.float32 else 1e-2
    assert rel_l2(stack.astype(jnp.float32), ref["state"].astype(jnp.float32)) < tol


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_single_state_float32(impl):
    """``layer=None``: a (b, h, p, n) state; float32 x, y and state within 1e-6 of the reference
    (the update is the same float32 arithmetic; y is summed in another order)."""
    inp = make_inputs(1, R=1, g=1)
    inp["x"] = inp["x"].astype(jnp.float32)
    state = inp["state"][0]
    y, new = ssd_decode_update(state, None, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"],
                               impl=impl, interpret=True)
    y_ref, new_ref = ssd_step(state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"])
    assert new.shape == state.shape and new.dtype == jnp.float32
    assert rel_l2(new, new_ref) < 1e-6
    assert rel_l2(y, y_ref) < 1e-6


def test_auto_is_xla_on_cpu_and_bad_impl_raises():
    from pallas_kernels.ssd.decode import resolve_impl
    assert resolve_impl("auto", 64, 128) == "xla"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("triton", 64, 128)
