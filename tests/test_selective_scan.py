"""Tests of the Mamba-1 selective scan (pallas_kernels/selective_scan)."""
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_scan_xla,
)
from tests.helpers import rel_l2

CHUNK = 16
DIFFERENTIABLE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(seed, b=2, l=50, d=8, n=4, groups=None, dtype=jnp.float32):
    """Random inputs (never zeros); B / C grouped as (b, l, g, n) when groups is set.

    numpy RNG on the host: eager jax.random ops would compile once per shape."""
    rng = np.random.default_rng(seed)
    bc_shape = (b, l, n) if groups is None else (b, l, groups, n)
    x = dict(
        u=rng.standard_normal((b, l, d)),
        delta=rng.uniform(0.05, 1.0, (b, l, d)),  # fine with or without softplus
        A=-np.exp(0.5 * rng.standard_normal((d, n))),
        B=rng.standard_normal(bc_shape),
        C=rng.standard_normal(bc_shape),
        D=rng.standard_normal(d),
        z=rng.standard_normal((b, l, d)),
        delta_bias=0.5 * rng.standard_normal(d),
        initial_state=rng.standard_normal((b, d, n)),
    )
    return {k: jnp.asarray(v, dtype) for k, v in x.items()}


def segments_from_starts(b, l, starts):
    """(b, l) int32 ids that change exactly at the positions in starts."""
    ids = np.zeros((b, l), np.int32)
    for t in starts:
        ids[:, t:] += 1
    return jnp.asarray(ids)


# --------------------------------------------------------------------------- reference
def naive_numpy_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids):
    """Float64 triple loop written straight from the definition (softplus always on)."""
    u, delta, A, B, C, D, z, delta_bias, state0 = (
        np.asarray(a, np.float64) for a in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    b, l, d = u.shape
    g = B.shape[2]
    y = np.zeros((b, l, d))
    final = np.zeros_like(state0)
    for i in range(b):
        state = state0[i].copy()
        for t in range(l):
            if t > 0 and segment_ids[i, t] != segment_ids[i, t - 1]:
                state[:] = 0.0
            for c in range(d):
                dt = np.log1p(np.exp(delta[i, t, c] + delta_bias[c]))
                grp = c // (d // g)
                state[c] = np.exp(dt * A[c]) * state[c] + dt * B[i, t, grp] * u[i, t, c]
                out = np.sum(state[c] * C[i, t, grp]) + D[c] * u[i, t, c]
                y[i, t, c] = out * z[i, t, c] / (1.0 + np.exp(-z[i, t, c]))
        final[i] = state
    return y, final


def test_reference_matches_naive_numpy_loop():
    x = make_inputs(0, b=2, l=12, d=4, n=3, groups=2)
    seg = segments_from_starts(2, 12, [5])
    run = jax.jit(functools.partial(selective_scan_reference, delta_softplus=True))
    y, final = run(**x, segment_ids=seg)
    y_np, final_np = naive_numpy_scan(**x, segment_ids=np.asarray(seg))
    assert rel_l2(y, y_np) < 1e-5
    assert rel_l2(final, final_np) < 1e-5


# --------------------------------------------------------------------------- xla vs reference
CASES = {
    # name: (make_inputs kwargs, optional inputs used, delta_softplus, segment starts)
    "ungrouped_plain_delta": (dict(l=50), ("D", "initial_state"), False, None),
    # segment starts 5 and 37 fall inside chunks, 16 and 48 on chunk starts (chunk 16).
    "grouped_all_options_segments": (
        dict(l=61, d=16, n=8, groups=4),
        ("D", "z", "delta_bias", "initial_state"), True, (5, 16, 37, 48),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_reference_values_and_grads(case):
    kwargs, optional, softplus, starts = CASES[case]
    x = make_inputs(1, **kwargs)
    names = ("u", "delta", "A", "B", "C", *optional)
    args = {k: x[k] for k in names}
    b, l = x["u"].shape[:2]
    assert l % CHUNK != 0
    seg = None if starts is None else segments_from_starts(b, l, starts)
    rng = np.random.default_rng(2)
    cotangents = tuple(
        jnp.asarray(rng.standard_normal(x[k].shape), jnp.float32) for k in ("u", "initial_state")
    )

    @functools.partial(jax.jit, static_argnums=0)
    def values_and_grads(fn, args):
        out, vjp = jax.vjp(lambda a: fn(**a, delta_softplus=softplus, segment_ids=seg), args)
        return out, vjp(cotangents)[0]

    xla = functools.partial(selective_scan_xla, chunk_size=CHUNK)
    (y_ref, s_ref), g_ref = values_and_grads(selective_scan_reference, args)
    (y_xla, s_xla), g_xla = values_and_grads(xla, args)
    assert y_xla.shape == y_ref.shape == x["u"].shape and y_xla.dtype == jnp.float32
    assert s_xla.shape == s_ref.shape == x["initial_state"].shape and s_xla.dtype == jnp.float32
    assert rel_l2(y_xla, y_ref) < 1e-5
    assert rel_l2(s_xla, s_ref) < 1e-5
    for name in names:
        assert rel_l2(g_xla[name], g_ref[name]) < 1e-5, name


def test_all_differentiable_inputs_are_covered():
    used = set()
    for _, optional, _, _ in CASES.values():
        used |= {"u", "delta", "A", "B", "C", *optional}
    assert used == set(DIFFERENTIABLE)


def test_public_api_default_impl_and_chunk():
    """impl="auto" (xla, default chunk 64; l = 70 needs padding) against impl="reference"."""
    x = make_inputs(3, l=70, groups=2)
    core = [x[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True,
              initial_state=x["initial_state"], segment_ids=segments_from_starts(2, 70, [33]))
    run = jax.jit(selective_scan, static_argnames=("delta_softplus", "return_final_state", "impl"))
    y, final = run(*core, **kw, return_final_state=True)
    y_ref, final_ref = run(*core, **kw, return_final_state=True, impl="reference")
    assert rel_l2(y, y_ref) < 1e-5 and rel_l2(final, final_ref) < 1e-5
    y_only = jax.eval_shape(functools.partial(selective_scan, **kw), *core)
    assert y_only.shape == y.shape and y_only.dtype == y.dtype


def test_bf16_inputs():
    """bf16 in, bf16 out, float32 state; compared with the float32 reference on the same values."""
    x16 = make_inputs(4, l=53, d=16, n=8, groups=2, dtype=jnp.bfloat16)
    x32 = {k: v.astype(jnp.float32) for k, v in x16.items()}
    y16, s16 = jax.jit(functools.partial(selective_scan_xla, delta_softplus=True, chunk_size=CHUNK))(**x16)
    y32, s32 = jax.jit(functools.partial(selective_scan_reference, delta_softplus=True))(**x32)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_l2(y16.astype(jnp.float32), y32) < 1e-2
    assert rel_l2(s16, s32) < 1e-5  # the state is float32 end to end


def test_packed_row_equals_separate_segments():
    """One packed row (xla) == its three documents run as a right-padded batch (xla).

    Starts at 20 and 35 are not chunk-aligned; the last document is the longest, so its
    row is unpadded and its final state is the packed row's final state."""
    lengths = (20, 15, 29)
    l, longest = sum(lengths), max(lengths)
    x = make_inputs(5, b=1, l=l, groups=2)
    ids = jnp.asarray(np.repeat(np.array([7, 3, 9]), lengths)[None], jnp.int32)
    shared = dict(A=x["A"], D=x["D"], delta_bias=x["delta_bias"])
    run = jax.jit(functools.partial(selective_scan, delta_softplus=True, return_final_state=True, impl="xla"))

    packed_names = ("u", "delta", "B", "C", "z")
    y_packed, final_packed = run(
        **{k: x[k] for k in packed_names}, **shared,
        initial_state=x["initial_state"], segment_ids=ids,
    )
    offsets = np.cumsum((0,) + lengths[:-1])

    def separate(a):  # (1, l, ...) -> (3, longest, ...), document i right-padded
        rows = [a[0, o:o + m] for o, m in zip(offsets, lengths)]
        return jnp.stack([jnp.pad(r, [(0, longest - len(r))] + [(0, 0)] * (r.ndim - 1)) for r in rows])

    initial = jnp.concatenate([x["initial_state"], jnp.zeros((2,) + x["initial_state"].shape[1:])])
    y_sep, final_sep = run(**{k: separate(x[k]) for k in packed_names}, **shared, initial_state=initial)
    for i, (o, m) in enumerate(zip(offsets, lengths)):
        assert rel_l2(y_packed[0, o:o + m], y_sep[i, :m]) < 1e-5, i
    assert rel_l2(final_packed[0], final_sep[2]) < 1e-5


def _largest_intermediate(fn, *args):
    """Largest array size (elements) produced anywhere in fn's jaxpr, nested jaxprs included."""
    def walk(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                sizes.append(walk(sub))
        return max(sizes)
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_xla_grad_never_materialises_b_l_d_n():
    """No forward or backward intermediate (incl. scan residuals) has b*l*d*n elements."""
    b, l, d, n = 2, 256, 8, 32
    x = make_inputs(6, b=b, l=l, d=d, n=n)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]

    def grad_of(fn):
        loss = lambda *a: fn(*a, delta_softplus=True)[0].sum()
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))

    xla = functools.partial(selective_scan_xla, chunk_size=CHUNK)
    full = b * l * d * n
    assert _largest_intermediate(grad_of(xla), *args) <= full // 8
    # the check has teeth: the sequential reference stores per-step (b, d, n) residuals
    assert _largest_intermediate(grad_of(selective_scan_reference), *args) >= full


# --------------------------------------------------------------------------- errors
def _bad(name, shape_change):
    x = make_inputs(7, l=10, groups=2)
    args = {k: x[k] for k in ("u", "delta", "A", "B", "C")}
    args.update(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], initial_state=x["initial_state"],
                segment_ids=jnp.zeros((2, 10), jnp.int32))
    args[name] = shape_change(args[name])
    return args


@pytest.mark.parametrize(
    "name, change, pattern",
    [
        ("u", lambda a: a[0], r"u must have shape \(b, l, d\), found \(10, 8\)"),
        ("delta", lambda a: a[:, :9], r"delta must have shape \(b, l, d\) = \(2, 10, 8\), found \(2, 9, 8\)"),
        ("A", lambda a: a[:7], r"A must have shape \(d, n\) with d = 8, found \(7, 4\)"),
        ("B", lambda a: jnp.concatenate([a, a[:, :, :1]], 2), r"B .*g dividing d = 8, found \(2, 10, 3, 4\)"),
        ("B", lambda a: a[:, :, :, :3], r"B must have shape \(b, l, g, n\) = \(2, 10, 2, 4\), found \(2, 10, 2, 3\)"),
        ("C", lambda a: a[:, :, 0], r"C must have shape B's shape = \(2, 10, 2, 4\), found \(2, 10, 4\)"),
        ("D", lambda a: a[:5], r"D must have shape \(d,\) = \(8,\), found \(5,\)"),
        ("z", lambda a: a[:1], r"z must have shape \(b, l, d\) = \(2, 10, 8\), found \(1, 10, 8\)"),
        ("delta_bias", lambda a: a[None], r"delta_bias must have shape \(d,\) = \(8,\), found \(1, 8\)"),
        ("initial_state", lambda a: a[:, :, :2], r"initial_state must have shape \(b, d, n\) = \(2, 8, 4\), found \(2, 8, 2\)"),
        ("segment_ids", lambda a: a[:, :4], r"segment_ids must have shape \(b, l\) = \(2, 10\), found \(2, 4\)"),
        ("segment_ids", lambda a: a.astype(jnp.float32), r"segment_ids must be integer"),
    ],
)
def test_bad_shapes_raise(name, change, pattern):
    args = _bad(name, change)
    with pytest.raises(ValueError, match=pattern):
        selective_scan(**args)


def test_unknown_impl_raises():
    x = make_inputs(8, l=10)
    with pytest.raises(ValueError, match=r"impl must be one of .*'xla'.*found 'cuda'"):
        selective_scan(*(x[k] for k in ("u", "delta", "A", "B", "C")), impl="cuda")


def test_lists_and_numpy_arguments_are_accepted():
    """As ssd: array-likes are converted (a list used to fail on .ndim)."""
    x = make_inputs(12, l=9)
    want = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], impl="xla")
    got = selective_scan(*(np.asarray(x[k]).tolist() for k in ("u", "delta", "A", "B", "C")),
                         D=np.asarray(x["D"]), impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-6)
