"""Lowering the GPU kernels for CUDA on a machine without a GPU (CPU tests, smoke runs)."""
from __future__ import annotations

import contextlib

import jax


# The GPU that CPU-side CUDA lowerings target (an abstract mesh's device: no GPU needed).
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="gpu")


@contextlib.contextmanager
def cuda_target(device=H100):
    """Inside, ``.lower(lowering_platforms=("cuda",))`` targets ``device``.

    From JAX 0.11 the Triton lowering asks which GPU it compiles for and, with none present,
    reads the device of the abstract mesh in context (else it raises); JAX 0.10 assumes one.
    Inside ``jax.shard_map``, give its mesh that device instead (an ``AbstractMesh`` with
    ``abstract_device=H100``)."""
    mesh = jax.sharding.AbstractMesh((1,), ("cuda_target",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield
