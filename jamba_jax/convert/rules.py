"""Name and layout rules between transformers checkpoints and our flat parameter names.

A ``Rule`` ties one checkpoint tensor to one of our parameters with a layout change:
``id`` (same), ``linear`` (torch ``(out, in)`` <-> our ``(in, out)``), ``conv`` (torch depthwise
``(c, 1, k)`` <-> our ``(k, c)``), ``experts`` (torch ``(E, out, in)`` <-> our ``(E, in, out)``).
A ``SplitRule`` ties one fused checkpoint tensor to several of our parameters (concatenated along
``axis`` of the checkpoint tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jamba_jax.config import Mamba1Config, Mamba2Config

_TO_OURS = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a[:, 0, :].T,
    "experts": lambda a: np.swapaxes(a, -1, -2),
}
_TO_HF = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.T[:, None, :],
    "experts": lambda a: np.swapaxes(a, -1, -2),
}


@dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    layout: str = "id"

    def to_ours(self, tensors: dict) -> dict:
        return {self.ours: _TO_OURS[self.layout](tensors[self.hf])}

    def to_hf(self, flat: dict) -> dict:
        return {self.hf: _TO_HF[self.layout](flat[self.ours])}

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def our_names(self) -> tuple[str, ...]:
        return (self.ours,)

    def hf_shape(self, our_shapes: dict) -> tuple:
        return _TO_HF[self.layout](np.empty(our_shapes[self.ours][0], np.int8)).shape


@dataclass(frozen=True)
class SplitRule:
    """One checkpoint tensor = our tensors (each after ``layout``) concatenated along ``axis``."""

    hf: str
    ours: tuple[str, ...]
    axis: int
    layout: str = "id"

    def to_ours(self, tensors: dict) -> dict:
        a = tensors[self.hf]
        parts = np.split(a, len(self.ours), axis=self.axis)
        return {name: _TO_OURS[self.layout](p) for name, p in zip(self.ours, parts)}

    def to_hf(self, flat: dict) -> dict:
        return {self.hf: np.concatenate([_TO_HF[self.layout](flat[n]) for n in self.ours], axis=self.axis)}

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def our_names(self) -> tuple[str, ...]:
        return self.ours

    def hf_shape(self, our_shapes: dict) -> tuple:
        parts = [_TO_HF[self.layout](np.empty(our_shapes[n][0], np.int8)) for n in self.ours]
        return np.concatenate(parts, axis=self.axis).shape


def linear_rules(hf: str, ours: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", f"{ours}.kernel", "linear")]
    if bias:
        rules.append(Rule(f"{hf}.bias", f"{ours}.bias"))
    return rules


def mamba1_rules(hf: str, ours: str, cfg: Mamba1Config) -> list[Rule]:
    """``hf``: the checkpoint prefix of the mixer (``backbone.layers.3.mixer``), ``ours``: ours."""
    rules = [Rule(f"{hf}.A_log", f"{ours}.A_log"), Rule(f"{hf}.D", f"{ours}.D"),
             Rule(f"{hf}.conv1d.weight", f"{ours}.conv_weight", "conv"),
             Rule(f"{hf}.dt_proj.bias", f"{ours}.dt_proj.bias")]
    if cfg.conv_bias:
        rules.append(Rule(f"{hf}.conv1d.bias", f"{ours}.conv_bias"))
    rules += linear_rules(f"{hf}.in_proj", f"{ours}.in_proj", cfg.proj_bias)
    rules += linear_rules(f"{hf}.x_proj", f"{ours}.x_proj", False)
    rules += linear_rules(f"{hf}.dt_proj", f"{ours}.dt_proj", False)
    rules += linear_rules(f"{hf}.out_proj", f"{ours}.out_proj", cfg.proj_bias)
    if cfg.bcdt_norm == "weighted":
        rules += [Rule(f"{hf}.dt_layernorm.weight", f"{ours}.dt_norm"),
                  Rule(f"{hf}.b_layernorm.weight", f"{ours}.B_norm"),
                  Rule(f"{hf}.c_layernorm.weight", f"{ours}.C_norm")]
    return rules


def mamba2_rules(hf: str, ours: str, cfg: Mamba2Config) -> list[Rule]:
    rules = [Rule(f"{hf}.A_log", f"{ours}.A_log"), Rule(f"{hf}.D", f"{ours}.D"),
             Rule(f"{hf}.dt_bias", f"{ours}.dt_bias"),
             Rule(f"{hf}.conv1d.weight", f"{ours}.conv_weight", "conv"),
             Rule(f"{hf}.norm.weight", f"{ours}.norm_weight")]
    if cfg.conv_bias:
        rules.append(Rule(f"{hf}.conv1d.bias", f"{ours}.conv_bias"))
    rules += linear_rules(f"{hf}.in_proj", f"{ours}.in_proj", cfg.proj_bias)
    rules += linear_rules(f"{hf}.out_proj", f"{ours}.out_proj", cfg.proj_bias)
    return rules
