"""Training configuration: ``configs/base.yaml``, then a ``--config`` file, then ``key=value`` overrides.

``configs/base.yaml`` lists every key with its default and a comment. A later layer may only set keys
that base declares (``logical_axis_rules`` may add logical names); anything else is an error naming
the key. Values are checked against `SCHEMA` when the `TrainConfig` is built, so a wrong type or an
out-of-range number fails before any device work, with the key's dotted name in the message.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from jamba_jax.config import SSM_IMPLS, ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")
#: Mesh axes the batch dimension may be split over (``tensor`` always sees the whole batch shard).
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


# --------------------------------------------------------------------------------------- YAML I/O

class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{key}: given twice in {node.start_mark.name} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 floats: PyYAML (YAML 1.1) reads `3e-4` (no dot) as a string.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _load_yaml_text(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    with open(path) as f:
        data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {str(path)!r} must hold a mapping of keys, found {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------ schema

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _positive_int(v):
    return None if _is_int(v) and v > 0 else "expected a positive integer"


def _nonneg_int(v):
    return None if _is_int(v) and v >= 0 else "expected an integer >= 0"


def _seed(v):
    return None if _is_int(v) and 0 <= v < 2**32 else "expected an integer in [0, 2**32)"


def _positive(v):
    return None if _is_num(v) and v > 0 else "expected a positive number"


def _nonneg(v):
    return None if _is_num(v) and v >= 0 else "expected a number >= 0"


def _unit(v):
    return None if _is_num(v) and 0 <= v <= 1 else "expected a number in [0, 1]"


def _beta(v):
    return None if _is_num(v) and 0 <= v < 1 else "expected a number in [0, 1)"


def _bool(v):
    return None if isinstance(v, bool) else "expected true or false"


def _str(v):
    return None if isinstance(v, str) else "expected a string"


def _opt_str(v):
    return None if v is None or isinstance(v, str) else "expected a string or null"


def _opt_positive_int(v):
    return None if v is None or (_is_int(v) and v > 0) else "expected a positive integer or null"


def _opt_nonneg_int(v):
    return None if v is None or (_is_int(v) and v >= 0) else "expected an integer >= 0 or null"


def _choice(*options):
    def check(v):
        return None if v in options else f"expected one of {', '.join(map(str, options))}"
    return check


def _model(v):
    return None if isinstance(v, (str, dict)) else "expected a preset name, a YAML path or a mapping"


def _opt_int_list(v):
    ok = v is None or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v))
    return None if ok else "expected a list of device ids or null"


#: dotted key -> check(value) returning None or what was expected. Every key of base.yaml is here.
SCHEMA: dict[str, Callable[[Any], str | None]] = {
    "steps": _positive_int, "seed": _seed, "batch_size": _positive_int, "seq_len": _positive_int,
    "grad_accum_steps": _positive_int,
    "model": _model, "dtype": _choice(*DTYPES), "param_dtype": _choice(*DTYPES),
    "remat": _choice("none", "full", "dots"), "ssm_impl": _choice(*SSM_IMPLS),
    "learning_rate": _positive, "warmup_steps": _nonneg_int, "min_lr_ratio": _unit,
    "schedule_steps": _opt_positive_int, "weight_decay": _nonneg,
    "decay_embeddings": _bool, "b1": _beta, "b2": _beta, "eps": _positive, "grad_clip": _nonneg,
    "on_nan": _choice("stop", "skip"),
    "checkpoints": _bool, "checkpoint_every": _nonneg_int, "keep_checkpoints": _positive_int, "async_checkpointing": _bool,
    "log_every": _positive_int, "eval_every": _nonneg_int, "eval_batches": _nonneg_int, "tensorboard": _bool,
    "progress": _bool, "sample_prompt": _str, "sample_tokens": _nonneg_int,
    "data.source": _choice("stdlib", "text", "jsonl", "array_record"), "data.path": _opt_str,
    "data.eval_path": _opt_str, "data.text_field": _str, "data.tokenizer": _str, "data.shuffle": _bool,
    "data.num_workers": _nonneg_int, "data.eval_fraction": _unit, "data.max_documents": _opt_positive_int,
    "data.packing": _choice("concat", "first_fit"), "data_loading": _choice("sharded", "global"),
    **{f"mesh.{a}": _positive_int for a in MESH_AXES},
    "distributed.coordinator_address": _opt_str, "distributed.num_processes": _opt_positive_int,
    "distributed.process_id": _opt_nonneg_int, "distributed.local_device_ids": _opt_int_list,
    "inject_nan_at_step": _nonneg_int,
}
#: Sections whose keys are free (checked by their own rules), not declared one by one in base.yaml.
OPEN_SECTIONS = ("logical_axis_rules",)
#: Keys whose command-line value is taken verbatim (a YAML parse would strip spaces, read `1` as an int).
STRING_KEYS = {k for k, check in SCHEMA.items() if check in (_str, _opt_str)}


# ------------------------------------------------------------------------------------------ merging

def _set_dotted(tree: dict, key: str, value, *, base: dict, origin: str) -> None:
    """``tree[a][b] = value`` for ``key = "a.b"``, refusing keys that ``base`` does not declare."""
    parts = key.split(".")
    node, base_node = tree, base
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: i + 1])
        if prefix in OPEN_SECTIONS:
            base_node = None
        elif not isinstance(base_node, dict) or part not in base_node:
            raise ConfigError(f"{key}: unknown key ({origin}); see configs/base.yaml for the keys")
        else:
            base_node = base_node[part]
        if not isinstance(base_node, dict) and base_node is not None:
            raise ConfigError(f"{key}: {prefix} is not a section ({origin})")
        node = node.setdefault(part, {})
    last = parts[-1]
    if base_node is not None and last not in base_node:
        raise ConfigError(f"{key}: unknown key ({origin}); see configs/base.yaml for the keys")
    node[last] = value


def _merge(tree: dict, update: dict, *, base: dict, origin: str, prefix: str = "") -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if key == "model":
            tree["model"] = copy.deepcopy(v)  # a preset name or a whole inline model: replaces
            continue
        section = key in OPEN_SECTIONS or any(key.startswith(s + ".") for s in OPEN_SECTIONS)
        if isinstance(v, dict) and isinstance(lookup(base, key), dict) and not section:
            _merge(tree, v, base=base, origin=origin, prefix=f"{key}.")
        elif isinstance(v, dict) and key in OPEN_SECTIONS:
            for name, axes in v.items():
                _set_dotted(tree, f"{key}.{name}", axes, base=base, origin=origin)
        else:
            _set_dotted(tree, key, copy.deepcopy(v), base=base, origin=origin)


def lookup(tree: dict, key: str):
    """``tree``'s value at dotted ``key`` (``"data.path"``), or None where it has none."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_override(arg: str) -> tuple[str, Any]:
    """``"mesh.fsdp=4"`` -> ``("mesh.fsdp", 4)``; the value is a YAML scalar (string keys: verbatim)."""
    if "=" not in arg:
        raise ConfigError(f"{arg}: expected KEY=VALUE (for example steps=100 or mesh.fsdp=4)")
    key, text = arg.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{arg}: empty key")
    if key in STRING_KEYS and not (SCHEMA[key] is _opt_str and text in ("null", "~")):
        return key, text
    try:
        return key, _load_yaml_text(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read the value {text!r} as YAML: {e}") from None


def merged_dict(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base_file: str | os.PathLike = BASE_CONFIG) -> tuple[dict, dict]:
    """The merged key tree and the dotted ``model.*`` overrides (applied to the resolved model)."""
    base = read_yaml(base_file)
    undeclared = sorted(k for k in _flatten(base) if k not in SCHEMA and k not in OPEN_SECTIONS)
    if undeclared:  # a developer error: base.yaml and SCHEMA must agree
        raise ConfigError(f"{undeclared[0]}: in {base_file} but not in jamba_jax.train.config.SCHEMA")
    tree = copy.deepcopy(base)
    if config_file is not None:
        _merge(tree, read_yaml(config_file), base=base, origin=f"--config {config_file}")
    model_overrides: dict[str, Any] = {}
    seen: set[str] = set()
    for arg in overrides:
        key, value = parse_override(arg)
        if key in seen:
            raise ConfigError(f"{key}: given twice on the command line")
        seen.add(key)
        if key.startswith("model."):
            model_overrides[key[len("model."):]] = value
        elif key == "model" or not isinstance(value, dict):
            _set_dotted(tree, key, value, base=base, origin="command line")
        else:
            _merge(tree, {key: value}, base=base, origin="command line")
    return tree, model_overrides


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model" and key not in OPEN_SECTIONS:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------- building

@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    seed: int
    batch_size: int
    seq_len: int
    grad_accum_steps: int
    model: ModelConfig
    dtype: str
    param_dtype: str
    remat: str
    ssm_impl: str
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float
    schedule_steps: int | None
    weight_decay: float
    decay_embeddings: bool
    b1: float
    b2: float
    eps: float
    grad_clip: float
    on_nan: str
    checkpoints: bool
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpointing: bool
    log_every: int
    eval_every: int
    eval_batches: int
    tensorboard: bool
    progress: bool
    sample_prompt: str
    sample_tokens: int
    data: Any  # jamba_jax.data.DataConfig
    data_loading: str
    mesh: MeshConfig
    logical_axis_rules: tuple[tuple[str, tuple[str, ...] | None], ...]
    distributed: DistributedConfig
    inject_nan_at_step: int
    #: the merged key tree, as written to WORKDIR/config.yaml (model resolved to a mapping)
    raw: dict = dataclasses.field(compare=False, repr=False, default_factory=dict)

    @property
    def rules(self) -> dict[str, tuple[str, ...] | None]:
        return dict(self.logical_axis_rules)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _resolve_model(spec, overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    from jamba_jax.presets import PRESET_DIR, model_config_from_dict, preset_names

    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            path = PRESET_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise ConfigError(f"model: unknown preset {spec!r}; presets: {', '.join(preset_names())}, "
                              "or give a path to a model YAML")
        spec = yaml.safe_load(path.read_text())
    spec = copy.deepcopy(spec)
    for key, value in overrides.items():
        node = spec
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None:
                    raise ConfigError(f"model.{key}: model.{part} is not a mapping")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    try:
        return model_config_from_dict(spec), spec
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model: {e}") from None


def _axis_rules(rules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    if not isinstance(rules, dict):
        raise ConfigError("logical_axis_rules: expected a mapping of logical axis -> mesh axis, list or null")
    out = []
    for name, axes in rules.items():
        if axes is None:
            out.append((str(name), None))
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes) if isinstance(axes, list) else None
        if axes_t is None or not all(a in MESH_AXES for a in axes_t) or len(set(axes_t)) != len(axes_t):
            raise ConfigError(f"logical_axis_rules.{name}: expected null, one of {', '.join(MESH_AXES)} "
                              f"or a list of them without repeats, got {axes!r}")
        out.append((str(name), axes_t))
    if "batch" not in dict(out):
        raise ConfigError("logical_axis_rules.batch: required (the mesh axes that split the batch)")
    return tuple(out)


def _data_config(raw: dict):
    from jamba_jax.data import DataConfig

    fields = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"data.{unknown[0]}: not a field of jamba_jax.data.DataConfig ({', '.join(sorted(fields))})")
    source, path = raw.get("source"), raw.get("path")
    if source in ("text", "jsonl", "array_record"):
        if path is None:
            raise ConfigError(f"data.path: required for data.source={source} (a file, directory or glob)")
    for key in ("path", "eval_path"):
        p = raw.get(key)
        if p is not None and not os.path.exists(p) and not glob.glob(p, recursive=True):
            raise ConfigError(f"data.{key}: {p!r} does not exist (no file, directory or glob match)")
    tokenizer = raw.get("tokenizer")
    if tokenizer != "bytes" and not os.path.exists(tokenizer):
        raise ConfigError(f"data.tokenizer: expected 'bytes' or a path to a tokenizer.json, {tokenizer!r} does not exist")
    try:
        return DataConfig(**raw)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from None


def build_config(tree: dict, model_overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Check every value of the merged tree and build the typed `TrainConfig`."""
    flat = _flatten(tree)
    for key, value in flat.items():
        if any(key == s or key.startswith(s + ".") for s in OPEN_SECTIONS):
            continue
        check = SCHEMA.get(key)
        if check is None:
            raise ConfigError(f"{key}: unknown key")
        problem = check(value)
        if problem:
            raise ConfigError(f"{key}: {problem}, got {value!r}")
    model, model_dict = _resolve_model(tree["model"], model_overrides or {})
    if tree["batch_size"] % tree["grad_accum_steps"]:
        raise ConfigError(f"batch_size: {tree['batch_size']} is not divisible by "
                          f"grad_accum_steps={tree['grad_accum_steps']}")
    horizon = tree["schedule_steps"] or tree["steps"]
    if tree["warmup_steps"] > horizon:
        raise ConfigError(f"warmup_steps: {tree['warmup_steps']} is more than the schedule's {horizon} steps "
                          "(schedule_steps, else steps)")
    dist = dict(tree["distributed"])
    if dist["local_device_ids"] is not None:
        dist["local_device_ids"] = tuple(dist["local_device_ids"])
    raw = copy.deepcopy(tree)
    raw["model"] = model_dict
    kwargs = {k: tree[k] for k in SCHEMA if "." not in k and k != "model"}
    for k in ("learning_rate", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "grad_clip"):
        kwargs[k] = float(kwargs[k])
    return TrainConfig(**kwargs, model=model, data=_data_config(tree["data"]), mesh=MeshConfig(**tree["mesh"]),
                       logical_axis_rules=_axis_rules(tree["logical_axis_rules"]),
                       distributed=DistributedConfig(**dist), raw=raw)


def load_config(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base_file: str | os.PathLike = BASE_CONFIG) -> TrainConfig:
    """base.yaml, then ``config_file``, then ``overrides`` (``["steps=10", "mesh.fsdp=2"]``)."""
    tree, model_overrides = merged_dict(config_file, overrides, base_file)
    return build_config(tree, model_overrides)


def check_devices(cfg: TrainConfig, n_devices: int, n_processes: int = 1) -> None:
    """Mesh and batch checks that need the device count."""
    m = cfg.mesh
    if m.size != n_devices:
        raise ConfigError(f"mesh data*fsdp*tensor*expert = {m.size} but there are {n_devices} devices "
                          f"(mesh.data={m.data}, mesh.fsdp={m.fsdp}, mesh.tensor={m.tensor}, mesh.expert={m.expert})")
    batch_axes = cfg.rules["batch"] or ()
    shards = 1
    for a in batch_axes:
        shards *= getattr(m, a)
    need = shards * cfg.grad_accum_steps
    if cfg.batch_size % need:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by the batch shards "
                          f"({'*'.join(batch_axes) or '1'} = {shards}) times grad_accum_steps={cfg.grad_accum_steps}")
    if cfg.batch_size % n_processes:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by the {n_processes} processes")
