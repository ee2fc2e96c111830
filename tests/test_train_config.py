"""Training configuration, optimizer pieces, sharding rules and checkpoint fallbacks (in-process, fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jamba_jax.train.config import BASE_CONFIG, SCHEMA, ConfigError, check_devices, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "train" / "smoke.yaml"


def error(*overrides, config=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config, overrides)
    return str(e.value)


def test_base_loads_and_every_key_is_documented():
    cfg = load_config()
    assert cfg.model.vocab_size == 257 and cfg.model.d_model == 128
    kinds = set(cfg.model.layers)
    assert {"mamba2", "attention", "moe", "mlp"} <= kinds and 6 <= cfg.model.n_layers <= 8
    # every key of base.yaml carries a comment on its line (sections and the rules table: above)
    lines = BASE_CONFIG.read_text().splitlines()
    in_rules = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith(" "):
            in_rules = stripped.startswith("logical_axis_rules:")
        key, value = stripped.split(":", 1)
        if in_rules or not value.strip():  # a rules entry or a section header
            assert lines[i - 1].strip().startswith("#") or in_rules, f"base.yaml section {key!r} has no comment"
            continue
        assert "#" in line, f"base.yaml key {key!r} has no comment"
    # base.yaml and the schema agree
    flat = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("logical_axis_rules",):
                walk(v, f"{prefix}{k}.")
            else:
                flat.add(f"{prefix}{k}")

    walk(yaml.safe_load(BASE_CONFIG.read_text()))
    assert flat - {"logical_axis_rules"} == set(SCHEMA)


def test_layers_and_overrides():
    cfg = load_config(SMOKE, ["steps=7", "mesh.fsdp=2", "learning_rate=1e-4", "model.d_model=48",
                              "data.shuffle=false", "logical_axis_rules.embed=null", "sample_prompt=x = "])
    assert cfg.steps == 7 and cfg.mesh.fsdp == 2 and cfg.learning_rate == 1e-4
    assert cfg.model.d_model == 48 and cfg.model.n_layers == 4  # inline model of smoke.yaml, one field changed
    assert cfg.data.shuffle is False and cfg.rules["embed"] is None and cfg.rules["mlp"] == ("tensor",)
    assert cfg.sample_prompt == "x = "  # verbatim, trailing space kept
    assert load_config(None, ["model=mamba2-130m"]).model.d_model == 768
    assert cfg.raw["model"]["d_model"] == 48  # what config.yaml records


def test_unknown_keys_are_named(tmp_path):
    assert error("bogus=1").startswith("bogus: unknown key")
    assert error("mesh.pipeline=2").startswith("mesh.pipeline: unknown key")
    assert "data.colour" in error("data.colour=red")
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\nlearning_rat: 0.1\n")
    assert error(config=path).startswith("learning_rat: unknown key")
    path.write_text("steps: 3\nsteps: 4\n")
    assert "steps: given twice" in error(config=path)
    assert "steps: given twice" in error("steps=3", "steps=4")
    assert error("model.nonsense=3").startswith("model:")
    assert "unknown preset" in error("model=no-such-model")


@pytest.mark.parametrize("override, key", [
    ("steps=-5", "steps"), ("steps=abc", "steps"), ("steps=2.5", "steps"), ("batch_size=0", "batch_size"),
    ("learning_rate=fast", "learning_rate"), ("dtype=float16", "dtype"), ("on_nan=ignore", "on_nan"),
    ("remat=some", "remat"), ("mesh.fsdp=0", "mesh.fsdp"), ("b2=1.5", "b2"), ("progress=maybe", "progress"),
    ("grad_accum_steps=3", "batch_size"), ("warmup_steps=5000", "warmup_steps"), ("data.source=csv", "data.source"),
    ("logical_axis_rules.embed=pipeline", "logical_axis_rules.embed"), ("data.packing=tight", "data.packing"),
    ("ssm_impl=bogus", "ssm_impl"), ("seed=4294967296", "seed"),
])
def test_bad_values_are_named(override, key):
    assert error(override).startswith(f"{key}:")


def test_data_paths_are_checked(tmp_path):
    assert error("data.source=jsonl").startswith("data.path: required")
    assert error("data.source=text", f"data.path={tmp_path}/missing.txt").startswith("data.path:")
    assert error(f"data.eval_path={tmp_path}/nope").startswith("data.eval_path:")
    assert error("data.tokenizer=/no/tokenizer.json").startswith("data.tokenizer:")


def test_device_checks():
    cfg = load_config(None, ["mesh.fsdp=4", "mesh.tensor=2"])
    with pytest.raises(ConfigError, match=r"^mesh data\*fsdp\*tensor\*expert = 8 but there are 1 devices"):
        check_devices(cfg, 1)
    check_devices(cfg, 8)
    with pytest.raises(ConfigError, match="^batch_size: 12 is not divisible by the batch shards"):
        check_devices(load_config(None, ["mesh.data=8", "batch_size=12"]), 8)


def test_cli_errors_exit_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    (tmp_path / "three.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(3)))
    for args, expected in [(["bogus=1"], "bogus: unknown key"),
                           (["mesh.fsdp=2"], "mesh data*fsdp*tensor*expert = 2 but there are 1 devices"),
                           (["data.source=jsonl", f"data.path={tmp_path}/none.jsonl"], "data.path:"),
                           (["data.source=jsonl", f"data.path={tmp_path}/three.jsonl", "data.eval_fraction=0.01"],
                            "data: jsonl data")]:     # eval_batches > 0 but no document is held out
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path / "w"), *args],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert p.returncode == 2, p.stderr[-2000:]
        assert expected in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------------------------- optim

def test_weight_decay_mask_and_schedule():
    from flax import nnx

    from jamba_jax.train.loop import build_model
    from jamba_jax.train.optim import decay_mask, learning_rate_schedule

    cfg = load_config(SMOKE, ["steps=100", "warmup_steps=10", "learning_rate=1e-3", "min_lr_ratio=0.1"])
    params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param)
    mask = {".".join(str(p) for p in path): bool(v.get_value())
            for path, v in nnx.to_flat_state(decay_mask(params))}
    decayed = {k for k, v in mask.items() if v}
    assert "blocks.0.mixer.in_proj.kernel" in decayed and "blocks.2.mixer.up_proj" in decayed
    assert "lm_head.kernel" in decayed and "blocks.1.mixer.q_proj.kernel" in decayed
    for name in ("blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.dt_bias", "blocks.0.mixer.conv_bias",
                 "blocks.0.mixer.norm_weight", "blocks.0.norm.weight", "final_norm.weight", "embed.embedding"):
        assert mask[name] is False, name
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1e-4) and float(lr(9)) == pytest.approx(1e-3)
    assert float(lr(10)) == pytest.approx(1e-3) and float(lr(100)) == pytest.approx(1e-4)
    assert float(lr(55)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)


# ---------------------------------------------------------------------------------------- sharding

def test_logical_rules_map_to_mesh_axes():
    from jax.sharding import PartitionSpec as P

    from jamba_jax.train.sharding import logical_to_spec

    class FakeMesh:
        shape = {"data": 2, "fsdp": 4, "tensor": 2, "expert": 1}

    rules = load_config().rules
    assert logical_to_spec(("embed", "mlp"), (64, 128), rules, FakeMesh) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (257, 64), rules, FakeMesh) == P(None, "fsdp")  # 257 odd
    assert logical_to_spec(("layers", "embed", "ssm_inner"), (2, 6, 8), rules, FakeMesh) == P(None, None, "tensor")
    batch = logical_to_spec(("batch", None), (16, 3), rules, FakeMesh)
    assert batch == P(("data", "fsdp"), None)  # expert has size 1
    with pytest.raises(ValueError, match="no rule for the logical axis 'pipeline'"):
        logical_to_spec(("pipeline",), (4,), rules, FakeMesh)


# ------------------------------------------------------------------------------------- checkpoints

class _Iterator:
    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def _state(value: float):
    return {"step": jnp.asarray(int(value), jnp.int32), "params": {"w": jnp.full((4, 3), value, jnp.float32)}}


def _target():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0.0))


def test_checkpoint_fallbacks(tmp_path):
    """A write cut short (orbax's tmp directory) is never restored; an unreadable newest step is set
    aside with a warning naming it and the previous one is restored, with the iterator position."""
    import shutil

    from jamba_jax.train.checkpoint import Checkpointer

    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(str(directory), every=1, keep=5, async_writes=True)
    it = _Iterator()
    for step in (1, 2, 3):
        it.position = 10 * step
        assert ckpt.save(step, _state(float(step)), it)
    ckpt.close()
    # a step-4 write interrupted before orbax's final rename
    shutil.copytree(directory / "3", directory / "4.orbax-checkpoint-tmp-1700000000")
    # step 3 truncated: every file of its state emptied
    for root, _, files in os.walk(directory / "3" / "state"):
        for f in files:
            open(os.path.join(root, f), "w").close()

    ckpt = Checkpointer(str(directory), every=1, keep=5)
    it = _Iterator()
    with pytest.warns(RuntimeWarning, match=f"checkpoint {directory}/3 cannot be restored"):
        step, state = ckpt.restore_latest(_target(), it)
    assert step == 2 and it.position == 20
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 3), 2.0))
    assert (directory / "3.unreadable").is_dir() and not (directory / "3").exists()
    assert not (directory / "4.orbax-checkpoint-tmp-1700000000").exists()  # cleaned up at start
    assert ckpt.save(3, _state(3.5), it)  # the step number is free again
    ckpt.close()


def test_ssm_impls_are_the_kernels_impls():
    from jamba_jax.config import SSM_IMPLS
    from pallas_kernels.selective_scan import api as scan_api
    from pallas_kernels.ssd import api as ssd_api
    assert set(SSM_IMPLS) == {"auto", "pallas", *ssd_api._BACKENDS} == {"auto", "pallas", *scan_api._BACKENDS}


def test_resume_refuses_another_data_pipeline(tmp_path):
    """A checkpoint's data position belongs to its pipeline: changed keys are named, not a KeyError."""
    from jamba_jax.train.loop import _check_resumable
    (tmp_path / "config.yaml").write_text(load_config(SMOKE).to_yaml())
    _check_resumable(str(tmp_path), load_config(SMOKE, ["steps=99", "learning_rate=0.01"]))   # fine
    for override, key in [("data.num_workers=2", "data.num_workers"), ("data.packing=first_fit", "data.packing"),
                          ("batch_size=4", "batch_size"), ("data.eval_fraction=0.2", "data.eval_fraction"),
                          ("param_dtype=bfloat16", "param_dtype")]:
        with pytest.raises(ConfigError, match=f"^{key}: differs"):
            _check_resumable(str(tmp_path), load_config(SMOKE, [override]))
