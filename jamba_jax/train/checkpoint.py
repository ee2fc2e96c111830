"""Checkpoints: the train state and the data iterator's position, side by side, with Orbax.

``WORKDIR/checkpoints/<step>/`` holds two items written by one ``CheckpointManager.save``:
``state`` (weights, optimizer state, step: ``StandardSave``, each host writing its shards) and
``data`` (grain's per-process JSON of the iterator state, ``process_<i>-of-<n>.json``).

Orbax writes a step into a temporary directory and renames it when every item is complete, so a
write cut short (a kill, a crash) leaves only a ``*.orbax-checkpoint-tmp-*`` directory that is never
listed as a step (and is removed at the next start). A step directory that is listed but cannot be
read (truncated or deleted files) is renamed ``<step>.unreadable`` with a warning naming it, and the
previous step is restored instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("jamba_jax.train")


class _IteratorState:
    """What grain's checkpoint handler needs of an iterator: its state as JSON bytes, taken at save
    time (so a background write never sees the iterator move on), and a place to put it back."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return self.state if isinstance(self.state, bytes) else json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # called by grain's handler after set_state
        pass


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_writes: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every, 1), max_to_keep=keep, enable_async_checkpointing=async_writes,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------------------- save
    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Start writing ``state`` and the iterator position as step ``step`` (in the background when
        asynchronous). ``force`` saves whatever the interval says (last step, preemption)."""
        if not force and not self.due(step):
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(_IteratorState(data_iterator.get_state())))
        return self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """All hosts agree that a preemption notice (SIGTERM to any host) asks to save now."""
        return self.manager.reached_preemption(step)

    # ---------------------------------------------------------------------------------- restore
    def restore_latest(self, target, data_iterator):
        """``(step, state)`` from the newest readable checkpoint, or ``None`` if there is none.

        ``target``: the state's tree of ``jax.ShapeDtypeStruct`` with shardings (arrays are read
        straight into their shards). ``data_iterator`` is moved to the saved position.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            holder = _IteratorState()
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      data=grain.checkpoint.CheckpointRestore(holder))
            try:
                restored = self.manager.restore(step, args=args)
                saved = json.loads(holder.state)
                state = restored["state"]
            except Exception as e:  # noqa: BLE001 (any failure to read means: not usable)
                path = os.path.join(self.directory, str(step))
                message = (f"checkpoint {path} cannot be restored ({type(e).__name__}: {str(e)[:300]}); "
                           f"it is renamed {path}.unreadable and the previous checkpoint is tried")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                log.warning(message)
                self._set_aside(step)
                continue
            live = data_iterator.get_state()
            data_iterator.set_state(json.dumps(saved).encode() if isinstance(live, bytes) else saved)
            return step, state
        if steps:
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored (tried steps {steps}); "
                               "remove the directory or choose another workdir")
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.unreadable"
            if os.path.exists(dst):
                dst = f"{dst}-{int(time.time())}"
            os.rename(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jamba_jax set aside checkpoint {step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
