"""Lowering the GPU kernels for CUDA on a machine without a GPU (CPU tests, smoke runs)."""
from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def cuda_target(device_kind: str = "NVIDIA H100 80GB HBM3", cores: int = 132):
    """Inside, ``.lower(lowering_platforms=("cuda",))`` targets ``device_kind``.

    From JAX 0.11 the Triton lowering asks which GPU it compiles for and, with none present,
    reads the device of the abstract mesh in context (else it raises); JAX 0.10 assumes one."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=cores,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("cuda_target",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield
