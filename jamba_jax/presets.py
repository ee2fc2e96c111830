"""Model presets: YAML files under ``configs/models/`` describing a `ModelConfig`.

``layers`` may be a list of kinds, a Megatron pattern string (``"M-M*"``), or a mapping
``{jamba: {n_layers, attn_period, attn_offset, expert_period, expert_offset}}`` or
``{repeat: N, period: [kinds]}``. ``python -m jamba_jax.presets`` prints every preset's total and
active parameter count without allocating weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from jamba_jax.config import ModelConfig, jamba_layers, layers_from_pattern

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def layers_from_spec(spec) -> tuple[str, ...]:
    if isinstance(spec, str):
        return layers_from_pattern(spec)
    if isinstance(spec, dict):
        if set(spec) == {"jamba"}:
            return jamba_layers(**spec["jamba"])
        if set(spec) == {"repeat", "period"}:
            return tuple(spec["period"]) * int(spec["repeat"])
        raise ValueError(f"invalid config: layers={spec!r}: expected a list, a pattern string, "
                         "{jamba: {...}} or {repeat: N, period: [...]}")
    return tuple(spec)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["layers"] = layers_from_spec(d["layers"])
    return ModelConfig.from_dict(d)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> ModelConfig:
    """A preset by name (``mamba2-130m``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"unknown model preset {name_or_path!r}; presets: {', '.join(preset_names())}")
    return model_config_from_dict(yaml.safe_load(path.read_text()))


def main(argv=None) -> None:
    from jamba_jax.params import count_params

    parser = argparse.ArgumentParser(prog="python -m jamba_jax.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", help="preset names (default: all)")
    parser.add_argument("--derive", action="store_true", help="also print each count's derivation")
    args = parser.parse_args(argv)
    print(f"{'preset':<20} {'layers':>6} {'total params':>16} {'active params':>16}")
    for name in args.presets or preset_names():
        cfg = load_preset(name)
        total, active = count_params(cfg), count_params(cfg, active=True)
        print(f"{name:<20} {cfg.n_layers:>6} {total:>16,} {active:>16,}")
        if args.derive:
            print(derivation(cfg))


def derivation(cfg: ModelConfig) -> str:
    """Per-part parameter counts that add up to the total: embedding, head, each sublayer kind."""
    from jamba_jax.params import param_shapes

    sizes: dict[str, int] = {}
    for name, (shape, _) in param_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            continue  # a buffer, not a parameter
        size = 1
        for s in shape:
            size *= s
        key = f"{cfg.layers[int(name.split('.')[1])]} sublayer" if name.startswith("layers.") else name
        sizes[key] = sizes.get(key, 0) + size
    lines, total = [], 0
    for key, size in sizes.items():
        if key.endswith("sublayer"):
            n = cfg.layers.count(key.split()[0])
            lines.append(f"    {n:>3} x {key:<22} {size // n:>14,} = {size:>16,}")
        else:
            lines.append(f"          {key:<22} {'':>14}   {size:>16,}")
        total += size
    lines.append(f"          {'total':<22} {'':>14}   {total:>16,}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
