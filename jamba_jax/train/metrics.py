"""Training logs: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step), TensorBoard event files
(tensorboardX, no TensorFlow needed) and a progress bar on stderr.

Only the first process writes. When a run resumes from step ``s``, lines of steps after ``s`` (written
by the interrupted run, whose later steps are about to be redone) are dropped from metrics.jsonl and
TensorBoard is told to purge them, so each step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

log = logging.getLogger("jamba_jax.train")


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # "nan"/"inf": keep the file strict JSON


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self.eval_steps: set[int] = set()    # steps with a held-out loss already logged (kept on resume)
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)")
            else:
                # purge what an earlier run logged past the resume step (from step 1 when it saved nothing)
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1,
                                         flush_secs=30)

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    if "eval_loss" in record:
                        self.eval_steps.add(record["step"])
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) if not isinstance(v, (bool, str)) else v
                                        for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if not isinstance(v, (bool, str)):
                    self._tb.add_scalar(k, float(v), int(step))

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """tqdm when installed (and ``enabled``), else a ``\\r`` status line; `echo` prints above it."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self.total, self.n, self.enabled = total, initial, enabled
        self._bar = None
        self._last = 0.0
        self._postfix = ""
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                         file=sys.stderr, smoothing=0.1)

    def update(self, n: int, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.update(n)
            if text and text != self._postfix:
                self._bar.set_postfix_str(text, refresh=False)
        else:
            now = time.monotonic()
            if now - self._last > 1.0 or self.n >= self.total:
                self._last = now
                sys.stderr.write(f"\rstep {self.n}/{self.total} {text}   ")
                sys.stderr.flush()
        self._postfix = text

    def echo(self, message: str) -> None:
        """Print a line on stdout without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            if self.enabled and self._last:
                sys.stderr.write("\n")
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._last:
            sys.stderr.write("\n")
