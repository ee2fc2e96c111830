"""Tests of the Pallas SSD backends (``pallas_gpu`` on Triton, ``pallas_tpu`` on Mosaic), run in
Pallas' interpreters on the CPU against the sequential reference: values, final states and the
gradients of every differentiable input; l not a multiple of the chunk, segment boundaries
inside chunks, initial states, 1 < g < h and g == h, head dims that need padding, bf16, the
``impl`` dispatch, and a call inside ``jax.shard_map`` over batch and heads.

Shapes are small (b=2, l <= 61, chunk 16, h=4, p=16, n=16) to keep the interpreters fast.
Float32 bounds are 1e-5 (relative L2); bf16 inputs 1e-2.
"""
import os
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd import ssd
from tests.helpers import rel_l2
from tests.test_ssd import make_inputs, segment_ids_from_starts

CHUNK = 16
BACKENDS = ["pallas_gpu", "pallas_tpu"]


@partial(jax.jit, static_argnames=("impl", "dt_softplus", "dt_limit"))
def outputs_and_grads(inputs, segment_ids, cotangents, *, impl, dt_softplus=False,
                      dt_limit=(0.0, float("inf"))):
    """(y, final_state) and the gradients of <y, wy> + <final_state, wf> w.r.t. every input."""
    interpret = {"interpret": True} if impl.startswith("pallas") else {}

    def f(diff):
        return ssd(**diff, chunk_size=CHUNK, dt_softplus=dt_softplus, dt_limit=dt_limit,
                   segment_ids=segment_ids, return_final_state=True, impl=impl, **interpret)

    outs, vjp = jax.vjp(f, inputs)
    (grads,) = vjp(cotangents)
    return outs, grads


def cotangents_for(inputs, seed=2):
    b, l, h, p = inputs["x"].shape
    n = inputs["B"].shape[-1]
    rng = np.random.RandomState(seed)
    return (jnp.asarray(rng.standard_normal((b, l, h, p)), inputs["x"].dtype),
            jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32))


# Segment starts for l = 45 with chunk 16: inside chunks (5, 20, 22, 23, 31, 33), at a chunk
# start (16), several in one chunk with a length-1 segment (22, 23), at the last position (44).
STARTS_45 = ([5, 16, 20, 22, 23, 31, 44], [31, 33])

CASES = {
    # Every option at once; 1 < g < h.
    "everything": dict(inputs=dict(l=45, g=2, p=16, D="hp", z=True, dt_bias=True,
                                   initial_state=True),
                       softplus=True, limit=(0.02, 0.12), starts=STARTS_45),
    # g == 1, D (h,), initial state; p = 8 and n = 12 (padded to 16 inside the GPU kernels).
    "g1_padded_dims": dict(inputs=dict(l=37, g=1, p=8, n=12, D="h", initial_state=True)),
    # g == h, z gate, no initial state, l = 2.5 chunks.
    "g_eq_h_z": dict(inputs=dict(l=40, g=4, p=16, z=True)),
}


# The TPU backend shares the chunk math with the GPU one (pallas_common); to keep the
# interpreters' time down it runs the case with every option, the GPU backend all of them.
@pytest.mark.parametrize("impl, case", [("pallas_gpu", c) for c in CASES]
                         + [("pallas_tpu", "everything")])
def test_matches_reference(impl, case):
    cfg = CASES[case]
    inputs = make_inputs(11, **cfg["inputs"])
    l = inputs["x"].shape[1]
    segment_ids = segment_ids_from_starts(l, cfg["starts"]) if "starts" in cfg else None
    run = partial(outputs_and_grads, inputs, segment_ids, cotangents_for(inputs),
                  dt_softplus=cfg.get("softplus", False),
                  dt_limit=cfg.get("limit", (0.0, float("inf"))))
    (y_ref, s_ref), g_ref = run(impl="reference")
    (y, s), g = run(impl=impl)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert rel_l2(y, y_ref) < 1e-5
    assert rel_l2(s, s_ref) < 1e-5
    assert set(g) == set(inputs)
    for name in g:
        assert g[name].shape == inputs[name].shape, name
        assert rel_l2(g[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("impl", BACKENDS)
def test_bf16_inputs(impl):
    """bf16 x, dt, B, C, z (float32 state and accumulation) against the float32 reference on
    the same bf16-rounded values: outputs and gradients within 1e-2."""
    cfg = dict(l=61, g=2, p=16, D="h", z=True, initial_state=True)
    inputs = make_inputs(3, dtype=jnp.bfloat16, **cfg)
    segment_ids = segment_ids_from_starts(61, ([9, 32, 40], [20]))
    cot = cotangents_for(inputs)
    (y, s), g = outputs_and_grads(inputs, segment_ids, cot, impl=impl)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    inputs32 = {k: v.astype(jnp.float32) for k, v in inputs.items()}
    cot32 = (cot[0].astype(jnp.float32), cot[1])
    (y_ref, s_ref), g_ref = outputs_and_grads(inputs32, segment_ids, cot32, impl="reference")
    assert rel_l2(y, y_ref) < 1e-2
    assert rel_l2(s, s_ref) < 1e-2
    for name in g:
        assert g[name].dtype == inputs[name].dtype, name
        assert rel_l2(g[name], g_ref[name]) < 1e-2, name


@pytest.mark.parametrize("splits, block_p, with_state_and_segments", [
    (4, 8, True),     # one chunk per split, p split in two; boundaries in and across splits
    (2, 16, False),   # zero initial state, no segments
])
def test_sequence_splits(splits, block_p, with_state_and_segments):
    """The GPU kernels with the sequence split across programs (``seq_splits``: zero-start
    split states, an XLA chain over the splits, then the splits in parallel) give the
    reference's values and gradients: l = 61 is 4 chunks of 16, the last one padded."""
    from pallas_kernels.ssd.pallas_gpu import GpuOptions, ssd_pallas_gpu
    extra = dict(D="hp", z=True, dt_bias=True, initial_state=True) if with_state_and_segments \
        else dict(D="h")
    inputs = make_inputs(13, l=61, g=2, p=16, **extra)
    segment_ids = (segment_ids_from_starts(61, ([5, 16, 20, 22, 23, 31, 44, 48], [31, 33, 47]))
                   if with_state_and_segments else None)
    options = GpuOptions(block_p=block_p, head_splits=1, seq_splits=splits, interpret=True)

    def run(fn):
        outs, vjp = jax.vjp(fn, inputs)
        return outs, vjp(cotangents_for(inputs))[0]

    kw = dict(chunk_size=CHUNK, segment_ids=segment_ids)
    if with_state_and_segments:
        kw.update(dt_softplus=True, dt_limit=(0.02, 0.12))
    (y_ref, s_ref), g_ref = run(lambda d: ssd(**d, **kw, return_final_state=True,
                                              impl="reference"))
    (y, s), g = run(jax.jit(lambda d: ssd_pallas_gpu(**d, **kw, options=options)))
    assert rel_l2(y, y_ref) < 1e-5
    assert rel_l2(s, s_ref) < 1e-5
    for name in inputs:
        assert rel_l2(g[name], g_ref[name]) < 1e-5, name


def test_impl_dispatch():
    """On CPU: 'auto' is the XLA path; 'pallas' needs interpret=True and then runs the GPU
    kernels; the explicit names are accepted."""
    from pallas_kernels.ssd import api
    assert jax.default_backend() == "cpu"
    assert api._resolve_impl("auto", False) == "xla"
    assert api._resolve_impl("auto", True) == "xla"
    assert api._resolve_impl("pallas", True) == "pallas_gpu"
    assert api._resolve_impl("pallas_tpu", True) == "pallas_tpu"
    inputs = make_inputs(5, l=20, g=2, p=16)
    with pytest.raises(ValueError, match="interpret=True"):
        ssd(**inputs, chunk_size=CHUNK, impl="pallas")


SHARD_MAP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import sys
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from pallas_kernels.cross_lowering import H100
    from pallas_kernels.ssd import ssd
    from tests.test_ssd import make_inputs

    assert len(jax.devices()) == 4
    mesh = jax.make_mesh((2, 2), ("batch", "heads"))
    inputs = make_inputs(7, b=2, l=24, h=4, p=16, g=2, D="h", initial_state=True)
    seg = jnp.asarray(np.array([[0] * 10 + [1] * 14, [0] * 24], np.int32))
    specs = dict(x=P("batch", None, "heads", None), dt=P("batch", None, "heads"), A=P("heads"),
                 B=P("batch", None, "heads", None), C=P("batch", None, "heads", None),
                 D=P("heads"), initial_state=P("batch", "heads", None, None))
    sharded = {{k: jax.device_put(v, jax.NamedSharding(mesh, specs[k])) for k, v in inputs.items()}}
    seg_sharded = jax.device_put(seg, jax.NamedSharding(mesh, P("batch", None)))
    rel = lambda a, b: float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))

    def make_grad(impl, sharded, check_vma, interpret, chunk=16, mesh=mesh):
        def loss(d, seg):
            def f(d, seg):
                return ssd(**d, chunk_size=chunk, segment_ids=seg, return_final_state=True,
                           impl=impl, interpret=interpret)
            if sharded:
                f = jax.shard_map(f, mesh=mesh, in_specs=(specs, P("batch", None)),
                                  out_specs=(P("batch", None, "heads", None),
                                             P("batch", "heads", None, None)),
                                  check_vma=check_vma)
            y, s = f(d, seg)
            return jnp.sum(y * jnp.cos(y)) + jnp.sum(s ** 2), (y, s)
        return jax.jit(jax.grad(loss, has_aux=True))

    for impl, platform in (("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")):
        # Run in the interpreter.  check_vma=False: JAX 0.10's interpreter re-evaluates the
        # kernel body on values that carry the mesh axes, which its fori_loops then reject.
        g_sh, (y_sh, s_sh) = make_grad(impl, True, False, True)(sharded, seg_sharded)
        g_1, (y_1, s_1) = make_grad(impl, False, False, True)(inputs, seg)
        errs = [rel(y_sh, y_1), rel(s_sh, s_1)] + [rel(g_sh[k], g_1[k]) for k in inputs]
        assert max(errs) < 1e-6, (impl, errs)
        # Compile path with check_vma=True (the default): lower for the kernel's platform.
        # For CUDA on an abstract mesh of H100s: JAX 0.11's Triton lowering asks which GPU.
        args, lower_mesh = (sharded, seg_sharded), mesh
        if platform == "cuda":
            lower_mesh = jax.sharding.AbstractMesh((2, 2), ("batch", "heads"),
                                                   abstract_device=H100)
            on = lambda v, spec: jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=jax.NamedSharding(lower_mesh, spec))
            args = ({{k: on(v, specs[k]) for k, v in inputs.items()}}, on(seg, P("batch", None)))
        with jax.sharding.use_abstract_mesh(lower_mesh.abstract_mesh):
            make_grad(impl, True, True, False, 128, lower_mesh).trace(*args).lower(
                lowering_platforms=(platform,))
        print(impl, "ok", max(errs))
""")


def test_inside_shard_map():
    """Both backends inside jax.shard_map over (batch, heads) on 4 forced host devices:
    values and gradients equal the unsharded call (interpreted), and the differentiated call
    lowers for the kernel's platform with check_vma on."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT.format(root=root)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "pallas_gpu ok" in proc.stdout and "pallas_tpu ok" in proc.stdout


@pytest.mark.parametrize("impl", BACKENDS)
def test_runs_with_x64_enabled(impl):
    """Index maps must not mix int32 block indices with Python ints that x64 makes int64."""
    inputs = make_inputs(5, l=20, g=2, p=16)
    want = ssd(**inputs, chunk_size=CHUNK, impl="reference")
    with jax.enable_x64(True):
        got = ssd(**inputs, chunk_size=CHUNK, impl=impl, interpret=True)
    assert rel_l2(got, want) < 1e-5
