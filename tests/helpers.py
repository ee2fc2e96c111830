"""Shared numerics helpers for the tests."""
import numpy as np


def rel_l2(actual, expected) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||, computed in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    denom = np.linalg.norm(e.ravel())
    assert denom > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.linalg.norm((a - e).ravel()) / denom)
