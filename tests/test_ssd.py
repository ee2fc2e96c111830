"""Tests for the Mamba-2 SSD op (pallas_kernels.ssd).

The sequential reference is first checked against a naive float64 numpy loop;
the chunked XLA backend is then checked against the reference (values and
gradients of every differentiable input) on small random problems.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd import ssd
from tests.helpers import rel_l2

CHUNK = 16
H, P, N = 4, 8, 16

# jit so each test compiles whole programs (op-by-op eager execution compiles far more).
ssd_jit = jax.jit(ssd, static_argnames=(
    "chunk_size", "dt_softplus", "dt_limit", "return_final_state", "impl"))

DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")

# Segment boundaries (positions where a new segment starts) for l = 70, chunk 16:
# inside a chunk (5), at chunk starts (16, 64), several per chunk with a length-1
# segment (20, 22, 23), at the last position of a chunk (47) and of the row (69).
# Row 1 reuses ids (0, 1, 0, ...): a change of id is a reset, equal ids are not merged.
SEGMENT_STARTS = ([5, 16, 20, 22, 23, 47, 64, 69], [31, 33, 50])


def segment_ids_from_starts(length, starts_per_row, reuse_ids=(False, True)):
    rows = []
    for starts, reuse in zip(starts_per_row, reuse_ids):
        ids = np.zeros(length, np.int32)
        for s in starts:
            ids[s:] += 1
        rows.append(ids % 2 if reuse else ids)
    return jnp.asarray(np.stack(rows))


def make_inputs(seed, *, b=2, l=37, h=H, p=P, g=1, n=N, D=None, z=False, dt_bias=False,
                initial_state=False, dtype=jnp.float32):
    """Random (never zero) inputs: a dict of the differentiable arguments of ssd.

    numpy draws, not jax.random: every new shape would cost a compilation.
    """
    rng = np.random.RandomState(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    inputs = dict(
        x=normal(b, l, h, p),
        dt=rng.uniform(0.01, 0.2, (b, l, h)).astype(np.float32),
        A=-rng.uniform(0.5, 4.0, (h,)).astype(np.float32),
        B=normal(b, l, g, n),
        C=normal(b, l, g, n),
    )
    if D is not None:
        inputs["D"] = normal(h) if D == "h" else normal(h, p)
    if z:
        inputs["z"] = normal(b, l, h, p)
    if dt_bias:
        # Raw dt around softplus^-1 of typical step sizes.
        inputs["dt"] = normal(b, l, h) - 2.5
        inputs["dt_bias"] = 0.5 * normal(h)
    if initial_state:
        inputs["initial_state"] = normal(b, h, p, n)
    low_precision = ("x", "dt", "B", "C", "z")
    return {k: jnp.asarray(v.astype(dtype) if k in low_precision else v) for k, v in inputs.items()}


@partial(jax.jit, static_argnames=("impl", "dt_softplus", "dt_limit"))
def outputs_and_grads(inputs, segment_ids, cotangents, *, impl, dt_softplus=False,
                      dt_limit=(0.0, float("inf"))):
    """(y, final_state) and the gradients of <y, wy> + <final_state, wf> w.r.t. inputs."""
    def f(diff):
        return ssd(**diff, chunk_size=CHUNK, dt_softplus=dt_softplus, dt_limit=dt_limit,
                   segment_ids=segment_ids, return_final_state=True, impl=impl)

    outs, vjp = jax.vjp(f, inputs)
    (grads,) = vjp(cotangents)
    return outs, grads


# ---------------------------------------------------------------------------
# The reference itself, against a naive float64 loop
# ---------------------------------------------------------------------------

def naive_numpy_ssd(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, segment_ids):
    """Literal float64 transcription of the recurrence (softplus always on)."""
    x, dt, A, B, C, D, z, dt_bias, s0 = (
        np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, z, dt_bias, initial_state))
    b, l, h, p = x.shape
    g = B.shape[2]
    y = np.zeros_like(x)
    final = np.zeros_like(s0)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            state = s0[bi, hi].copy()
            for t in range(l):
                if t > 0 and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                    state = np.zeros_like(state)
                d = np.log1p(np.exp(dt[bi, t, hi] + dt_bias[hi]))
                d = min(max(d, dt_limit[0]), dt_limit[1])
                state = np.exp(d * A[hi]) * state + d * np.outer(x[bi, t, hi], B[bi, t, gi])
                out = state @ C[bi, t, gi] + D[hi] * x[bi, t, hi]
                gate = z[bi, t, hi] / (1.0 + np.exp(-z[bi, t, hi]))
                y[bi, t, hi] = out * gate
            final[bi, hi] = state
    return y, final


def test_reference_matches_naive_loop():
    l = 11
    inputs = make_inputs(0, l=l, h=4, p=3, g=2, n=5, D="hp", z=True, dt_bias=True,
                         initial_state=True)
    segment_ids = jnp.array([[7, 7, 7, 2, 2, 9, 9, 9, 9, 9, 2],
                             [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    dt_limit = (0.05, 0.3)
    y, final = ssd_jit(**inputs, chunk_size=4, dt_softplus=True, dt_limit=dt_limit,
                   segment_ids=segment_ids, return_final_state=True, impl="reference")
    y_np, final_np = naive_numpy_ssd(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
        inputs["z"], inputs["dt_bias"], dt_limit, inputs["initial_state"], np.asarray(segment_ids))
    assert rel_l2(y, y_np) < 1e-5
    assert rel_l2(final, final_np) < 1e-5


# ---------------------------------------------------------------------------
# XLA (chunked) vs reference: values and gradients
# ---------------------------------------------------------------------------

CASES = {
    # l not a multiple of the chunk everywhere; g = 1, 1 < g < h and g == h.
    "g1_D_h_initial_state": dict(l=37, g=1, D="h", initial_state=True),
    "g_eq_h_D_hp_z": dict(l=45, g=4, D="hp", z=True),
    "segments_initial_state": dict(l=70, g=2, initial_state=True, segments=True),
    "everything": dict(l=70, g=2, D="hp", z=True, dt_bias=True, softplus=True,
                       limit=(0.02, 0.12), initial_state=True, segments=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_reference(case):
    cfg = dict(CASES[case])
    softplus = cfg.pop("softplus", False)
    limit = cfg.pop("limit", (0.0, float("inf")))
    segments = cfg.pop("segments", False)
    inputs = make_inputs(1, **cfg)
    b, l, h, p = inputs["x"].shape
    segment_ids = segment_ids_from_starts(l, SEGMENT_STARTS) if segments else None
    rng = np.random.RandomState(2)
    cotangents = (jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32),
                  jnp.asarray(rng.standard_normal((b, h, p, N)), jnp.float32))
    run = partial(outputs_and_grads, inputs, segment_ids, cotangents,
                  dt_softplus=softplus, dt_limit=limit)

    (y_ref, s_ref), g_ref = run(impl="reference")
    (y, s), g = run(impl="xla")
    assert rel_l2(y, y_ref) < 1e-5
    assert rel_l2(s, s_ref) < 1e-5
    assert set(g) == set(inputs) and set(inputs) <= set(DIFFERENTIABLE)
    for name in g:
        assert rel_l2(g[name], g_ref[name]) < 1e-5, name


def test_bf16_inputs():
    cfg = dict(l=61, g=2, D="h", z=True, initial_state=True)
    inputs = make_inputs(3, dtype=jnp.bfloat16, **cfg)
    segment_ids = segment_ids_from_starts(61, ([9, 32, 40], [20]))
    kwargs = dict(chunk_size=CHUNK, segment_ids=segment_ids, return_final_state=True)
    y, s = ssd_jit(**inputs, impl="xla", **kwargs)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # Against the float32 reference on the same (bf16-rounded) values ...
    y_ref, s_ref = ssd_jit(**{k: np.asarray(v, np.float32) for k, v in inputs.items()},
                           impl="reference", **kwargs)
    assert rel_l2(y, y_ref) < 1e-2
    assert rel_l2(s, s_ref) < 1e-2
    # ... and on the original float32 values.
    y_ref32, s_ref32 = ssd_jit(**make_inputs(3, **cfg), impl="reference", **kwargs)
    assert rel_l2(y, y_ref32) < 1e-2
    assert rel_l2(s, s_ref32) < 1e-2


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_row_equals_separate_segments(impl):
    """One packed row == each document run on its own (as rows of one batch)."""
    lengths = [16, 9, 1, 20, 7]          # boundaries at 16 (chunk start), 25, 26, 46
    ids = [3, 1, 3, 1, 2]                # ids are reused: only changes matter
    l = sum(lengths)
    packed = make_inputs(4, b=1, l=l, g=2, D="h", z=True, dt_bias=True, initial_state=True)
    segment_ids = jnp.asarray(np.repeat(ids, lengths)[None].astype(np.int32))
    common = dict(chunk_size=CHUNK, dt_softplus=True, return_final_state=True, impl=impl)
    y, final = ssd_jit(**packed, segment_ids=segment_ids, **common)

    # Document i becomes row i, right-padded with steps that leave the state
    # unchanged (raw dt = -1e4, so softplus(dt + bias) == 0, and x = 0).
    # Only document 0 starts from the initial state.
    starts = np.cumsum([0] + lengths[:-1])
    def split(a, fill):
        a = np.asarray(a)
        rows = [np.pad(a[0, s:s + n], [(0, l - n)] + [(0, 0)] * (a.ndim - 2),
                       constant_values=fill) for s, n in zip(starts, lengths)]
        return jnp.asarray(np.stack(rows))
    separate = dict(packed, x=split(packed["x"], 0.0), dt=split(packed["dt"], -1e4),
                    B=split(packed["B"], 1.0), C=split(packed["C"], 1.0),
                    z=split(packed["z"], 1.0))
    initial_state = np.zeros((len(lengths), H, P, N), np.float32)
    initial_state[0] = packed["initial_state"][0]
    separate["initial_state"] = jnp.asarray(initial_state)
    y_sep, final_sep = ssd_jit(**separate, **common)

    for i, (s, n) in enumerate(zip(starts, lengths)):
        assert rel_l2(y[0, s:s + n], y_sep[i, :n]) < 1e-5, i
    assert rel_l2(final[0], final_sep[-1]) < 1e-5


def test_auto_short_sequence_and_no_final_state():
    inputs = make_inputs(5, l=5, g=2, initial_state=True)   # l < chunk_size
    y_auto = ssd_jit(**inputs, chunk_size=CHUNK)
    y_ref = ssd_jit(**inputs, chunk_size=CHUNK, impl="reference")
    assert isinstance(y_auto, jax.Array) and y_auto.shape == inputs["x"].shape
    assert rel_l2(y_auto, y_ref) < 1e-5


@pytest.mark.parametrize("arg, bad, message", [
    ("x", lambda i: i["x"][0], "'x' expected shape"),
    ("dt", lambda i: i["dt"][:, :, :2], "'dt' expected shape"),
    ("A", lambda i: i["A"][:3], "'A' expected shape"),
    ("B", lambda i: np.concatenate([i["B"]] * 3, axis=2), "'B' expected a group count"),
    ("C", lambda i: i["C"][..., :8], "'C' expected shape"),
    ("D", lambda i: np.ones((H, P + 1)), "'D' expected shape"),
    ("z", lambda i: i["x"][:, :5], "'z' expected shape"),
    ("dt_bias", lambda i: np.ones((H + 1,)), "'dt_bias' expected shape"),
    ("initial_state", lambda i: np.ones((2, H, P, N + 1)), "'initial_state' expected shape"),
    ("segment_ids", lambda i: np.zeros((2, 36), np.int32), "'segment_ids' expected shape"),
    ("segment_ids", lambda i: np.zeros((2, 37), np.float32), "'segment_ids' expected an integer"),
    ("chunk_size", lambda i: 0, "'chunk_size'"),
    ("dt_limit", lambda i: None, "'dt_limit'"),
    ("impl", lambda i: "cuda", "'impl'"),
])
def test_bad_arguments(arg, bad, message):
    inputs = {k: np.asarray(v) for k, v in make_inputs(6, l=37, g=2).items()}
    kwargs = dict(inputs, chunk_size=CHUNK)
    kwargs[arg] = bad(inputs)
    with pytest.raises(ValueError, match=message):
        ssd(**kwargs)


def test_numpy_integer_chunk_size():
    inputs = make_inputs(6, l=37, g=2)
    want = ssd(**inputs, chunk_size=CHUNK, impl="xla")
    np.testing.assert_array_equal(ssd(**inputs, chunk_size=np.int64(CHUNK), impl="xla"), want)
