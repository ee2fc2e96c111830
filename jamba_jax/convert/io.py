"""Reading and writing checkpoint directories: config.json plus safetensors (single or sharded),
or PyTorch ``.bin`` files read with ``torch.load(weights_only=True)`` (never arbitrary unpickling)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _decode_floats(obj):
    """transformers writes non-finite floats as ``{"__float__": "Infinity"}``; turn them back into floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def _encode_floats(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": str(obj).replace("inf", "Infinity").replace("nan", "NaN")}
    if isinstance(obj, dict):
        return {k: _encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_floats(v) for v in obj]
    return obj


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a checkpoint directory with config.json)")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found")
    return _decode_floats(json.loads(cfg_file.read_text()))


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors = {}
    for f in files:
        with safe_open(f, framework="np") as st:
            for key in st.keys():
                tensors[key] = st.get_tensor(key)
    return tensors


def _read_bin(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{files[0].name} is a PyTorch pickle: install torch to read it (pip install torch), "
            "or convert the checkpoint to safetensors") from e
    tensors = {}
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)
        for key, t in state.items():
            t = t.detach()
            tensors[key] = (t.float().numpy().astype("bfloat16") if t.dtype == torch.bfloat16 else t.numpy())
    return tensors


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory by name, as numpy arrays."""
    path = Path(path)
    if (path / "model.safetensors").exists():          # transformers' first choice too
        return _read_safetensors([path / "model.safetensors"])
    for index_name, reader in ((SAFETENSORS_INDEX, _read_safetensors), (BIN_INDEX, _read_bin)):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return reader([path / s for s in shards])
    single = sorted(path.glob("*.safetensors"))
    if single:
        return _read_safetensors(single)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return _read_bin(bins)
    raise FileNotFoundError(f"no weights in {path}: expected *.safetensors (with {SAFETENSORS_INDEX} if sharded) "
                            f"or pytorch_model.bin")


def write_checkpoint(path: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors, sharded with an index above ``max_shard_bytes``.
    Weight files of an earlier checkpoint in ``path`` that the new one does not overwrite (other
    shards, index files, ``pytorch_model*.bin``) are deleted once the new files are written, so
    no reader can mix the two."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stale = {p for pattern in ("model*.safetensors", "pytorch_model*.bin", SAFETENSORS_INDEX, BIN_INDEX)
             for p in path.glob(pattern)}
    (path / "config.json").write_text(json.dumps(_encode_floats(config), indent=2, sort_keys=True) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        written = {path / "model.safetensors"}
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for a in tensors.values())
        (path / SAFETENSORS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        written = {path / f for f in weight_map.values()} | {path / SAFETENSORS_INDEX}
    for old in stale - written:
        old.unlink()
