"""End-to-end training runs of ``train.py`` in subprocesses.

One uninterrupted run of the smoke config is the reference; the other runs must reproduce its losses:
after a kill -9 and a restart (exactly), after a SIGTERM, after falling back from a corrupt checkpoint,
sharded over 8 CPU devices two ways and over two processes (to float32 rounding). Compiled programs are
shared between runs through JAX's persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "train" / "smoke.yaml")
STEPS = 60
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
# The reference run: no eval, no sample, a checkpoint every 5 steps, every step logged.
BASE = {"steps": STEPS, "schedule_steps": STEPS, "checkpoint_every": 5, "keep_checkpoints": 3, "log_every": 1,
        "eval_batches": 0, "sample_tokens": 0, "progress": "false"}


def cli(**overrides) -> list[str]:
    """``--config smoke.yaml`` and the `BASE` keys, with ``overrides`` (dots as ``__``)."""
    keys = {**BASE, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["--config", SMOKE, *(f"{k}={v}" for k, v in keys.items())]


BASE_ARGS = cli()
# The same training curve, stopped after 4 steps.
FIRST_STEPS = dict(steps=4, checkpoint_every=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    # Cheap compiles (LLVM's expensive passes off): these models are tiny, compiling dominates.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "PYTHONUNBUFFERED": "1", "XLA_FLAGS": FAST_COMPILE}


def command(workdir, args) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *args]


def train(workdir, args, env, *, extra_env=None, timeout=600, expect=0) -> subprocess.CompletedProcess:
    p = subprocess.run(command(workdir, args), capture_output=True, text=True, cwd=ROOT,
                       env={**env, **(extra_env or {})}, timeout=timeout)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def records(workdir) -> list[dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    out = {}
    for r in records(workdir):
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def steps_on_disk(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def assert_close(actual: dict, expected: dict, rtol: float):
    assert actual, "no losses"
    for step, loss in actual.items():
        assert abs(loss - expected[step]) <= rtol * abs(expected[step]), (step, loss, expected[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("reference")
    train(workdir, BASE_ARGS, env)
    result = losses(workdir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return workdir, result


def wait_for_step(proc, workdir, step: int, timeout: float = 300) -> None:
    """Poll metrics.jsonl until it logs ``step`` (the process must still be running)."""
    path = Path(workdir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        if path.exists():
            with open(path) as f:
                logged = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if logged and max(logged) >= step:
                return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


# ----------------------------------------------------------------------------------------------- tests

def test_default_run_shortened(tmp_path, env):
    """`python train.py` (the tiny hybrid on stdlib bytes), a few steps: loss falls, bpb and a sample print."""
    p = train(tmp_path / "run", ["steps=12", "warmup_steps=3", "batch_size=8", "seq_len=128", "log_every=1",
                                 "eval_batches=1", "sample_tokens=24", "checkpoint_every=0"], env)
    result = losses(tmp_path / "run")
    assert len(result) == 12 and result[12] < result[1] - 0.3, result
    assert p.stdout.count("bits/byte") == 2 and "(start)" in p.stdout and "(end)" in p.stdout, p.stdout
    assert "greedy sample" in p.stdout and "def " in p.stdout.split("greedy sample")[1]
    evals = [r for r in records(tmp_path / "run") if "eval_bpb" in r]
    assert [r["step"] for r in evals] == [0, 12] and evals[1]["eval_bpb"] < evals[0]["eval_bpb"]
    assert steps_on_disk(tmp_path / "run") == [12]  # the last step is always saved
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "memory per device" in p.stderr


def test_kill_9_then_resume_matches(tmp_path, env, reference):
    ref_dir, ref = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(command(workdir, BASE_ARGS), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, workdir, 17)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert steps_on_disk(workdir), "no checkpoint before the kill"
    p = train(workdir, BASE_ARGS, env)
    restored = int(p.stderr.split("resumed from ")[1].split()[0].rsplit("/", 1)[1])
    assert 5 <= restored < STEPS
    result = losses(workdir)
    assert sorted(result) == list(range(1, STEPS + 1))
    assert result == ref  # exactly: the same program on the same data from the restored state


def test_sigterm_saves_and_resumes(tmp_path, env, reference):
    _, ref = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(command(workdir, BASE_ARGS), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, workdir, 8)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert 8 <= stopped < STEPS and stopped in steps_on_disk(workdir)  # saved off the 5-step interval
    p = train(workdir, BASE_ARGS, env)
    assert f"resumed from {workdir}/checkpoints/{stopped}" in p.stderr
    assert losses(workdir) == ref


def test_corrupt_checkpoint_falls_back(tmp_path, env, reference):
    ref_dir, ref = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    assert steps_on_disk(workdir) == [50, 55, 60]
    for root, _, files in os.walk(workdir / "checkpoints" / "60"):
        for f in files:
            open(os.path.join(root, f), "w").close()  # truncated
    p = train(workdir, BASE_ARGS, env)
    assert f"checkpoint {workdir}/checkpoints/60 cannot be restored" in p.stderr
    assert f"resumed from {workdir}/checkpoints/55" in p.stderr
    assert losses(workdir) == ref  # steps 56..60 redone, identically


def test_nan_stops_without_poisoned_checkpoint(tmp_path, env, reference):
    _, ref = reference
    p = train(tmp_path / "stop", cli(inject_nan_at_step=12), env, expect=3)
    assert "non-finite loss at step 12" in p.stdout
    assert steps_on_disk(tmp_path / "stop") == [5, 10]  # nothing at or after the bad step
    logged = losses(tmp_path / "stop")
    assert logged[12] == "nan" and max(logged) == 12
    assert {s: logged[s] for s in range(1, 12)} == {s: ref[s] for s in range(1, 12)}
    # the checkpoints are clean: resuming with the injection off reproduces the reference
    train(tmp_path / "stop", BASE_ARGS, env)
    assert losses(tmp_path / "stop") == ref
    # on_nan=skip drops that update and goes on
    train(tmp_path / "skip", cli(inject_nan_at_step=12, on_nan="skip", steps=15), env)
    rows = {r["step"]: r for r in records(tmp_path / "skip") if "loss" in r}
    assert rows[12].get("skipped") is True and sorted(rows) == list(range(1, 16))
    assert all(isinstance(rows[s]["loss"], float) for s in (13, 14, 15))


@pytest.mark.parametrize("mesh", [dict(mesh__fsdp=4, mesh__tensor=2), dict(mesh__data=2, mesh__expert=4)],
                         ids=["fsdp4-tensor2", "data2-expert4"])
def test_eight_devices_match_one(tmp_path, env, reference, mesh):
    _, ref = reference
    train(tmp_path / "run", cli(**FIRST_STEPS, **mesh, checkpoints="false"), env,
          extra_env={"XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"})
    result = losses(tmp_path / "run")
    assert sorted(result) == [1, 2, 3, 4]
    assert steps_on_disk(tmp_path / "run") == []  # checkpoints=false: not even the last step
    assert_close(result, ref, 1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, env, reference):
    _, ref = reference
    workdir = tmp_path / "run"
    port = _free_port()
    args = dict(FIRST_STEPS, mesh__data=2, data_loading="global", eval_batches=1, sample_tokens=4,
                distributed__coordinator_address=f"127.0.0.1:{port}", distributed__num_processes=2)
    procs = [subprocess.Popen(command(workdir, cli(**args, distributed__process_id=i)), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-5000:]
    assert "process 0 of 2" in outputs[0][1] and "process 1 of 2" in outputs[1][1]
    assert "greedy sample" in outputs[0][0] and "greedy sample" not in outputs[1][0]  # process 0 prints
    result = losses(workdir)
    assert sorted(result) == [1, 2, 3, 4]
    assert_close(result, ref, 1e-5)
    data_states = sorted(p.name for p in (workdir / "checkpoints" / "4" / "data").glob("process_*"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]


def test_bfloat16_params_and_resumed_evals_logged_once(tmp_path, env):
    """param_dtype=bfloat16 trains (the optimizer state keeps its dtypes step to step); a resumed run
    logs each held-out loss once."""
    args = dict(schedule_steps=6, checkpoint_every=2, eval_every=2, eval_batches=1, param_dtype="bfloat16")
    train(tmp_path / "run", cli(steps=4, **args), env)
    train(tmp_path / "run", cli(steps=6, **args), env)
    result = losses(tmp_path / "run")
    assert sorted(result) == list(range(1, 7)) and all(math.isfinite(v) for v in result.values())
    evals = [r["step"] for r in records(tmp_path / "run") if "eval_loss" in r]
    assert evals == [0, 2, 4, 6]
