"""Mamba-1 selective scan: ``selective_scan`` dispatches to the reference or XLA backend."""
from .api import selective_scan
from .reference import selective_scan_reference
from .xla import DEFAULT_CHUNK_SIZE, selective_scan_xla

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_xla", "DEFAULT_CHUNK_SIZE"]
