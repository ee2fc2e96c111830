"""Pieces shared by the GPU kernels that split a sequence across programs (SSD, selective scan).

A kernel whose programs each walk a whole sequence in order is latency bound when there are few
of them.  Splitting the sequence into S parts gives S times the programs: a first kernel computes,
per part, what the part adds to the carried state from a zero start; `chain_splits` turns those
into the true state at every part boundary; the main kernel then runs all parts at once.
Also here: the device queries (SM count, compute capability) the kernels' heuristics use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def num_sms() -> int:
    """Streaming multiprocessors of the first GPU (132, an H100's, without one: interpret mode)."""
    try:
        dev = jax.local_devices(backend="gpu")[0]
        return int(getattr(dev, "core_count", 132) or 132)
    except RuntimeError:
        return 132


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first NVIDIA GPU (9.0 on Hopper), or None without one (ROCm
    devices report names such as "gfx942" instead)."""
    try:
        dev = jax.local_devices(backend="gpu")[0]
        if dev.platform != "cuda":
            return None
        return tuple(int(v) for v in str(dev.compute_capability).split(".")[:2])
    except (RuntimeError, AttributeError, ValueError):
        return None


def effective_splits(requested: int, chunks: int) -> int:
    """The largest divisor of ``chunks`` not above ``requested`` (at least 1)."""
    S = max(1, min(requested, chunks))
    while chunks % S:
        S -= 1
    return S


def chain_splits(local, carry, first, reverse: bool):
    """The state (or state gradient) at every split boundary, stacked on axis 1: (b, S, ...).

    ``local`` (b, S-1, ...): each split's zero-start contribution; ``carry`` (b, S-1, ...),
    broadcastable to it: what the split does to the state crossing it.  Forward: they belong to
    splits 0 .. S-2 and ``first`` enters split 0; entering[k + 1] = carry[k] entering[k] +
    local[k].  Reverse (gradients): splits 1 .. S-1 and ``first`` leaves split S-1; leaving[k] =
    carry[k] leaving[k + 1] + local[k].
    """
    out = [first]
    order = range(local.shape[1] - 1, -1, -1) if reverse else range(local.shape[1])
    for k in order:
        out.append(carry[:, k] * out[-1] + local[:, k])
    return jnp.stack(out[::-1] if reverse else out, axis=1)
