"""Mamba-2 SSD (state-space duality) scan: ``from pallas_kernels.ssd import ssd``."""
from pallas_kernels.ssd.api import ssd

__all__ = ["ssd"]
