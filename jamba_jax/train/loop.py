"""The training loop: sharded state, the jitted train step, held-out eval, checkpoints, a greedy sample.

The train state is a plain pytree ``{"step", "params", "opt_state"[, "buffers"]}``: ``params`` are the
model's ``nnx.Param`` variables (the float32 master copy when ``param_dtype=float32``), ``buffers``
any other model variables (MoE routing biases), ``opt_state`` the optax state, whose moments keep their
weight's logical axis names. Its shape and sharding are derived from ``jax.eval_shape`` alone, so a
large model is initialised (or restored) directly into its shards.

One step is ``jax.jit(train_step, in_shardings, out_shardings, donate_argnums=0)`` compiled once
ahead of time. It splits the global batch into ``grad_accum_steps`` microbatches (a ``lax.scan``,
gradients summed in float32), normalises by the number of target tokens of the whole batch (so
the loss and gradients do not depend on how the batch is split), adds the MoE auxiliary losses,
clips and applies AdamW. A non-finite loss, gradient or update leaves the state as it was.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jamba_jax.model import LanguageModel
from jamba_jax.train import sharding as shd
from jamba_jax.train.checkpoint import Checkpointer
from jamba_jax.train.config import ConfigError, TrainConfig, check_devices, lookup
from jamba_jax.train.metrics import MetricsWriter, Progress
from jamba_jax.train.optim import learning_rate_schedule, make_optimizer, with_learning_rate

log = logging.getLogger("jamba_jax.train")

EXIT_OK, EXIT_NAN = 0, 3
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
AUX_KEYS = ("load_balancing_loss", "router_z_loss")


# ------------------------------------------------------------------------------------ distributed

def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize_distributed(cfg: TrainConfig) -> None:
    """``jax.distributed.initialize`` when the config or the environment describes several processes.

    Explicit values come from ``distributed.*`` or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES``
    / ``JAX_PROCESS_ID``; on a TPU pod slice, under SLURM or Open MPI JAX finds them itself.
    """
    d = cfg.distributed
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = d.num_processes if d.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id is not None else _env_int("JAX_PROCESS_ID")
    cluster = (("," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
               or (_env_int("SLURM_NTASKS") or 1) > 1 or (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1)
    if address or (n or 1) > 1 or cluster:
        if jax.distributed.is_initialized():
            return
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                                   local_device_ids=list(d.local_device_ids) if d.local_device_ids else None)
        log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


# ---------------------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, rngs: nnx.Rngs) -> LanguageModel:
    kwargs: dict[str, Any] = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                                  impl=cfg.ssm_impl)
    if cfg.remat != "none":
        kwargs["remat"] = cfg.remat
    return LanguageModel(cfg.model, rngs=rngs, **kwargs)


def _ce_parts(logits, targets):
    """``logsumexp`` over the vocabulary and the target's logit, float32 ``(b, l)`` each."""
    x = logits.astype(jnp.float32)  # fused into the reductions, never written whole
    top = jnp.max(x, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return lse, target_logit


@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``logsumexp(logits) - logits[target]`` per position, float32, for logits of any float dtype.

    Nothing of the logits' size is kept or written in float32: the forward pass keeps only the
    log-normaliser ``(b, l)`` besides the logits themselves, and the backward pass writes the
    gradient ``softmax - onehot`` once, in the logits' dtype (the log-softmax form would keep a
    float32 ``(b, l, vocab)`` log-probability array for the backward pass).
    """
    lse, target_logit = _ce_parts(logits, targets)
    return lse - target_logit


def _cross_entropy_fwd(logits, targets):
    lse, target_logit = _ce_parts(logits, targets)
    return lse - target_logit, (logits, targets, lse)


def _cross_entropy_bwd(res, g):
    logits, targets, lse = res
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    dlogits = (probs - onehot.astype(jnp.float32)) * g[..., None]
    return dlogits.astype(logits.dtype), np.zeros(targets.shape, jax.dtypes.float0)


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_losses(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token cross-entropy ``(b, l)`` (float32, not masked) and the model's auxiliary losses."""
    logits, aux = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                        return_aux=True)
    return cross_entropy(logits, batch["targets"].astype(jnp.int32)), aux


class Trainer:
    """Builds everything a run needs for a config and a mesh; `run` in this module drives it."""

    def __init__(self, cfg: TrainConfig, mesh, tokenizer):
        self.cfg, self.mesh, self.tokenizer = cfg, mesh, tokenizer
        self.rules = cfg.rules
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg)
        abstract_model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
        self.graphdef, abstract_params, abstract_buffers = nnx.split(abstract_model, nnx.Param, ...)
        self.has_buffers = bool(jax.tree.leaves(abstract_buffers))
        self.abstract_state = jax.eval_shape(lambda: self._init_state(cfg.seed))
        self.state_sharding = shd.state_shardings(self.abstract_state, mesh, self.rules)
        self.state_target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_sharding)
        self.batch_sharding = shd.batch_sharding(mesh, self.rules)
        self.replicated = NamedSharding(mesh, P())
        moe = cfg.model.moe
        self.aux_coefs = {"load_balancing_loss": moe.aux_loss_coef if moe else 0.0,
                          "router_z_loss": moe.z_loss_coef if moe else 0.0}
        self._step_fn = None
        self._eval_fn = None

    # ----------------------------------------------------------------------------------- state
    def _init_state(self, seed):
        model = build_model(self.cfg, nnx.Rngs(seed))
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}
        if self.has_buffers:
            state["buffers"] = buffers
        return state

    def init_state(self):
        """Fresh state, each array created directly in its shards."""
        return jax.jit(self._init_state, static_argnums=0, out_shardings=self.state_sharding)(self.cfg.seed)

    def model(self, state):
        if self.has_buffers:
            return nnx.merge(self.graphdef, state["params"], state["buffers"])
        return nnx.merge(self.graphdef, state["params"])

    def n_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state["params"]))

    # ------------------------------------------------------------------------------- train step
    def train_step(self, state, batch):
        cfg = self.cfg
        k = cfg.grad_accum_steps
        params = state["params"]
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def objective(p, micro):
            model = self.model({**state, "params": p})
            ce, aux = token_losses(model, micro)
            ce_sum = jnp.sum(ce * micro["loss_mask"])
            aux_term = sum(self.aux_coefs[key] * aux[key] for key in AUX_KEYS)
            return ce_sum / n_tokens + aux_term / k, (ce_sum, aux)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if k == 1:
            (_, (ce_sum, aux)), grads = grad_fn(params, batch)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            # Microbatch j = rows j, j+k, j+2k, ...: every device keeps its own rows (no data movement).
            micro_sharding = shd.batch_sharding(self.mesh, self.rules, leading=1)

            def split(x):
                x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_sharding)

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                g_acc, ce_acc, aux_acc = carry
                (_, (ce_sum, aux)), g = grad_fn(params, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, ce_acc + ce_sum, {key: aux_acc[key] + aux[key] / k for key in AUX_KEYS}), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            aux0 = {key: jnp.zeros((), jnp.float32) for key in AUX_KEYS}
            (grads, ce_sum, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0), micro)

        loss = ce_sum / n_tokens
        if cfg.inject_nan_at_step:
            loss = jnp.where(state["step"] + 1 == cfg.inject_nan_at_step, jnp.nan, loss)
        grad_norm = optax.global_norm(grads)
        lr = self.schedule(state["step"])
        opt_state = with_learning_rate(state["opt_state"], lr)
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        # the float32 gradients make the moments float32; keep each leaf in its initial dtype (the
        # parameters' when param_dtype=bfloat16) so the state's types are the same every step
        new_opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt_state, opt_state)
        new_params = optax.apply_updates(params, updates)
        param_norm = optax.global_norm(new_params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {**state, "step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(new_opt_state, opt_state)}
        metrics = {"loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "param_norm": param_norm,
                   **aux, "finite": finite}
        return new_state, metrics

    def abstract_batch(self, batch_size: int | None = None):
        b, l = batch_size or self.cfg.batch_size, self.cfg.seq_len
        dtypes = {"loss_mask": jnp.float32}
        return {key: jax.ShapeDtypeStruct((b, l), dtypes.get(key, jnp.int32), sharding=self.batch_sharding)
                for key in BATCH_KEYS}

    def compile_step(self):
        """AOT-compile the train step for the state and batch shapes; logs its memory use once."""
        jitted = jax.jit(self.train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                         out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        t0 = time.perf_counter()
        with shd.activation_sharding(self.mesh, self.rules):
            compiled = jitted.lower(self.state_target, self.abstract_batch()).compile()
        log.info("train step compiled in %.1f s", time.perf_counter() - t0)
        try:
            mem = compiled.memory_analysis()
        except Exception:  # noqa: BLE001 (not every backend reports it)
            mem = None
        if mem is not None:
            mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
            log.info("train step memory per device: arguments %s, outputs %s (aliased %s), temporaries %s, "
                     "code %s", mib(mem.argument_size_in_bytes), mib(mem.output_size_in_bytes),
                     mib(mem.alias_size_in_bytes), mib(mem.temp_size_in_bytes),
                     mib(mem.generated_code_size_in_bytes))
        self._step_fn = compiled
        return compiled

    def step(self, state, batch):
        if self._step_fn is None:
            self.compile_step()
        return self._step_fn(state, batch)

    # -------------------------------------------------------------------------------------- eval
    def _eval_sums(self, params, buffers, batch):
        model = self.model({"params": params, "buffers": buffers})
        ce, _ = token_losses(model, batch)
        mask = batch["loss_mask"]
        is_byte = (batch["targets"] < 256).astype(jnp.float32)
        return {"nats": jnp.sum(ce * mask), "tokens": jnp.sum(mask), "bytes": jnp.sum(mask * is_byte)}

    def evaluate(self, state, batches) -> dict[str, float]:
        """Mean held-out loss (nats per token) and, for the byte tokenizer, bits per byte: all the
        cross-entropy (EOS predictions included) in bits, over the number of predicted bytes."""
        if not batches:
            return {}
        if self._eval_fn is None:
            buffers_sharding = self.state_sharding.get("buffers")
            self._eval_fn = jax.jit(self._eval_sums, in_shardings=(
                self.state_sharding["params"], buffers_sharding, self.batch_sharding),
                out_shardings=self.replicated)
        totals = {"nats": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in batches:
            with shd.activation_sharding(self.mesh, self.rules):  # traced at the first call
                sums = jax.device_get(self._eval_fn(state["params"], state.get("buffers"), batch))
            for key in totals:
                totals[key] += float(sums[key])
        out = {"eval_loss": totals["nats"] / max(totals["tokens"], 1.0)}
        if _is_byte_tokenizer(self.tokenizer):
            out["eval_bpb"] = totals["nats"] / math.log(2) / max(totals["bytes"], 1.0)
        return out

    # ------------------------------------------------------------------------------------ sample
    def sample(self, state, prompt: str, n_tokens: int) -> str:
        """Greedy continuation of ``prompt`` (``jamba_jax.generate`` when present, else a full
        forward pass over a fixed-length buffer per new token)."""
        tok = self.tokenizer
        ids = [tok.eos_id] + list(tok.encode(prompt))  # documents follow an EOS in training
        try:
            from jamba_jax.generate import generate  # noqa: PLC0415
        except ImportError:
            generate = None
        if generate is not None and jax.process_count() == 1:
            try:
                out = generate(self.model(state), np.asarray([ids], np.int32), max_new_tokens=n_tokens,
                               eos_token_id=tok.eos_id)
                new = np.asarray(out)[0, len(ids):].tolist()
                if tok.eos_id in new:
                    new = new[: new.index(tok.eos_id)]
                return prompt + tok.decode(new)
            except TypeError:
                pass  # another signature: fall back to the plain loop
        total = len(ids) + n_tokens

        def next_token(params, buffers, buf, t):
            logits = self.model({"params": params, "buffers": buffers})(buf)
            return jnp.argmax(jax.lax.dynamic_index_in_dim(logits[0], t - 1, keepdims=False)).astype(jnp.int32)

        fn = jax.jit(next_token, in_shardings=(self.state_sharding["params"], self.state_sharding.get("buffers"),
                                               self.replicated, self.replicated), out_shardings=self.replicated)
        buf = np.zeros((1, total), np.int32)
        buf[0, : len(ids)] = ids
        new = []
        for t in range(len(ids), total):
            dev_buf = jax.make_array_from_callback(buf.shape, self.replicated, lambda idx, b=buf.copy(): b[idx])
            dev_t = jax.make_array_from_callback((), self.replicated, lambda idx, t=t: np.int32(t))
            nxt = int(jax.device_get(fn(state["params"], state.get("buffers"), dev_buf, dev_t)))
            if nxt == tok.eos_id:
                break
            buf[0, t] = nxt
            new.append(nxt)
        return prompt + tok.decode(new)


def _is_byte_tokenizer(tok) -> bool:
    return type(tok).__name__ == "ByteTokenizer"


# ------------------------------------------------------------------------------------------- run

class _Stop:
    """SIGTERM (and SIGINT) ask the loop to save and leave at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self, multiprocess: bool) -> None:
        # With several processes JAX's preemption service owns SIGTERM and tells every host (see
        # Checkpointer.reached_preemption); replacing its handler would hide the notice, and a signal
        # seen by one process alone must not make it leave the others' collectives.
        if multiprocess:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: keys a checkpoint's saved data position depends on (grain's iterator state describes that pipeline)
#: (and which documents train: eval_fraction of them are held out unless an eval_path is given)
DATA_POSITION_KEYS = ("seq_len", "batch_size", "seed", "data_loading", "data.source", "data.path",
                      "data.tokenizer", "data.text_field", "data.shuffle", "data.num_workers", "data.max_documents",
                      "data.packing")


def _check_resumable(workdir: str, cfg: TrainConfig) -> None:
    """Refuse to resume a workdir whose checkpoints belong to another model or dtype, or whose saved data
    position belongs to another data pipeline (naming the keys that changed)."""
    import yaml  # noqa: PLC0415

    path = os.path.join(workdir, "config.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = yaml.safe_load(f) or {}
    for key in ("model", "param_dtype"):
        if key in old and old[key] != cfg.raw[key]:
            raise ConfigError(f"{key}: differs from the run saved in {workdir} ({path}); its checkpoints cannot "
                              "be restored into this model: use another --workdir")
    changed = [key for key in DATA_POSITION_KEYS if lookup(old, key) != lookup(cfg.raw, key)]
    if (lookup(old, "data.eval_path") is None) != (lookup(cfg.raw, "data.eval_path") is None):
        changed.append("data.eval_path")
    elif lookup(cfg.raw, "data.eval_path") is None and (lookup(old, "data.eval_fraction")
                                                         != lookup(cfg.raw, "data.eval_fraction")):
        changed.append("data.eval_fraction")
    if changed:
        was = ", ".join(f"{key}={lookup(old, key)!r}" for key in changed)
        raise ConfigError(f"{changed[0]}: differs from the run saved in {workdir} (it had {was}); its checkpoints "
                          "hold a position in that data pipeline: set these back to resume, or use another --workdir")


def run(cfg: TrainConfig, workdir: str) -> int:
    """Train (or resume) in ``workdir``; returns the process exit status."""
    from jamba_jax.data import load_tokenizer, make_eval_batches, make_train_iterator  # noqa: PLC0415

    initialize_distributed(cfg)
    check_devices(cfg, jax.device_count(), jax.process_count())
    primary = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size})")
    mesh = shd.make_mesh(cfg.mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir):
        _check_resumable(workdir, cfg)
    trainer = Trainer(cfg, mesh, tokenizer)
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())
    log.info("model: %s sublayers %s, %s parameters; mesh %s over %d devices, %d processes",
             cfg.model.n_layers, "".join(_symbol(k) for k in cfg.model.layers), f"{trainer.n_params():,}",
             dict(mesh.shape), jax.device_count(), jax.process_count())

    if cfg.data_loading == "global":  # every process reads the whole batch, keeps its rows
        shard_index, shard_count = 0, 1
    else:
        shard_index, shard_count = shd.process_batch_shard(trainer.batch_sharding, (cfg.batch_size, cfg.seq_len))
    try:   # the data's own checks (files, fields, splits) are configuration errors, found before compiling
        data_iter = make_train_iterator(cfg.data, tokenizer, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                                        seed=cfg.seed, process_index=shard_index, process_count=shard_count)
        eval_batches = [shd.replicated_batch(b, trainer.batch_sharding) for b in
                        make_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                          num_batches=cfg.eval_batches)] if cfg.eval_batches else []
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e
    ckpt = Checkpointer(ckpt_dir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                        async_writes=cfg.async_checkpointing)
    restored = ckpt.restore_latest(trainer.state_target, data_iter)
    if restored is None:
        state, start = trainer.init_state(), 0
    else:
        start, state = restored
        log.info("resumed from %s/%d", ckpt_dir, start)
    trainer.compile_step()
    writer = MetricsWriter(workdir, enabled=primary, tensorboard=cfg.tensorboard, resume_step=start)
    progress = Progress(cfg.steps, start, enabled=cfg.progress and primary)
    echo = progress.echo if primary else (lambda message: None)
    stop = _Stop()
    stop.install(jax.process_count() > 1)

    def do_eval(step: int, when: str) -> dict:
        if not eval_batches:
            return {}
        result = trainer.evaluate(state, eval_batches)      # every process: a collective computation
        if step not in writer.eval_steps:   # a resumed run's earlier process may have logged this step
            writer.write(step, result)
        if "eval_bpb" in result:
            echo(f"held-out loss at step {step} ({when}): {result['eval_bpb']:.3f} bits/byte "
                 f"({result['eval_loss']:.4f} nats/token)")
        else:
            echo(f"held-out loss at step {step} ({when}): {result['eval_loss']:.4f} nats/token")
        return result

    do_eval(start, "start")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    pending: list[tuple[int, dict]] = []  # metrics of dispatched steps not yet read back
    clock = {"t": time.perf_counter(), "steps": 0}
    status = EXIT_OK
    bad_step = None

    def drain(keep_last: bool) -> bool:
        """Read back pending metrics (all but the newest with ``keep_last``, so the host reads step
        t-1 while the device runs step t); log them; False if a non-finite step must stop the run."""
        nonlocal bad_step
        while len(pending) > (1 if keep_last else 0):
            step, m = pending.pop(0)
            m = jax.device_get(m)
            clock["steps"] += 1
            if not bool(m["finite"]):
                echo(f"step {step}: non-finite loss (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); "
                     + ("update skipped" if cfg.on_nan == "skip" else "stopping"))
                writer.write(step, {**{k: v for k, v in m.items() if k != "finite"}, "skipped": True})
                if cfg.on_nan == "stop":
                    bad_step = step
                    return False
            elif step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rate = clock["steps"] * tokens_per_step / max(now - clock["t"], 1e-9)
                clock["t"], clock["steps"] = now, 0
                writer.write(step, {**{k: v for k, v in m.items() if k != "finite"}, "tokens_per_sec": rate})
            progress.update(1, loss=float(m["loss"]))
        return True

    step = start
    try:
        while step < cfg.steps:
            batch = shd.global_batch({k: v for k, v in next(data_iter).items() if k in BATCH_KEYS},
                                     trainer.batch_sharding, cfg.batch_size)
            state, metrics = trainer.step(state, batch)
            step += 1
            pending.append((step, metrics))
            if not drain(keep_last=True):
                break
            preempted = stop.signal is not None or (jax.process_count() > 1 and ckpt.reached_preemption(step))
            if cfg.checkpoints and (ckpt.due(step) or step == cfg.steps or preempted):
                if not drain(keep_last=False):
                    break
                ckpt.save(step, state, data_iter, force=True)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                drain(keep_last=False)
                do_eval(step, "during")
                clock["t"], clock["steps"] = time.perf_counter(), 0   # the rate counts training time only
            if preempted:
                echo(f"stopping at step {step} ({stop.signal or 'preemption'}): "
                     + (f"checkpoint saved in {ckpt_dir}; run the same command again to resume" if cfg.checkpoints
                        else "checkpoints=false, so nothing was saved"))
                break
        else:
            drain(keep_last=False)
        if bad_step is not None:
            status = EXIT_NAN
            ckpt.wait()
            echo(f"stopped: non-finite loss at step {bad_step}; nothing after step {ckpt.latest_step()} was saved "
                 f"(set on_nan=skip to drop such updates and go on)")
        elif step >= cfg.steps and stop.signal is None:
            progress.close()
            do_eval(step, "end")
            if cfg.sample_tokens:
                text = trainer.sample(state, cfg.sample_prompt, cfg.sample_tokens)
                echo(f"greedy sample ({cfg.sample_tokens} tokens max) after step {step}:\n{text}")
                writer.text("sample", text, step)
    finally:
        stop.restore()
        progress.close()
        ckpt.close()
        writer.close()
    return status


def _symbol(kind: str) -> str:
    return {"mamba1": "m", "mamba2": "M", "attention": "*", "mlp": "-", "moe": "E"}[kind]
