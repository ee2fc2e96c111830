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


def run_on_simulated_devices(script: str, devices: int, timeout: int = 300) -> str:
    """Run ``script`` (Python source) in a fresh process on ``devices`` simulated CPU devices, from the project
    root; fail the test if it fails, else return its standard output. XLA reads the device count once per
    process, hence the subprocess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    p = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout
