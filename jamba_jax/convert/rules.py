"""Name and layout rules between transformers checkpoints and our flat parameter names.

A ``Rule`` ties one checkpoint tensor to one of our parameters with a layout change:
``id`` (same), ``linear`` (torch ``(out, in)`` <-> our ``(in, out)``), ``conv`` (torch depthwise
``(c, 1, k)`` <-> our ``(k, c)``), ``experts`` (torch ``(E, out, in)`` <-> our ``(E, in, out)``).
A ``SplitRule`` ties one fused checkpoint tensor to several of our parameters (concatenated along
``axis`` of the checkpoint tensor). A ``StackRule`` stacks per-expert checkpoint tensors into one
of ours; a ``LayoutChoice`` lists alternative checkpoint layouts of the same parameters (the first
is written, any is read: see `resolve_layouts`).
"""

from __future__ import annotations

import dataclasses
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


# --- rules over several checkpoint tensors, and checkpoints stored in more than one layout ----------

def hf_shapes(rule, our_shapes: dict) -> dict[str, tuple]:
    """Checkpoint name -> expected shape for every tensor ``rule`` reads (rules over one tensor
    need only ``hf_shape``)."""
    if hasattr(rule, "hf_shapes"):
        return rule.hf_shapes(our_shapes)
    return {rule.hf: tuple(rule.hf_shape(our_shapes))}


@dataclass(frozen=True)
class StackRule:
    """Our tensor with a leading axis of ``n`` = checkpoint tensors ``hf.format(e=i)`` for ``i < n``,
    each after ``layout``, stacked along a new axis 0 (per-expert checkpoint tensors)."""

    hf: str  # a template with "{e}"
    ours: str
    n: int
    layout: str = "id"

    @property
    def hf_names(self) -> tuple[str, ...]:
        return tuple(self.hf.format(e=i) for i in range(self.n))

    @property
    def our_names(self) -> tuple[str, ...]:
        return (self.ours,)

    def to_ours(self, tensors: dict) -> dict:
        return {self.ours: np.stack([_TO_OURS[self.layout](tensors[n]) for n in self.hf_names])}

    def to_hf(self, flat: dict) -> dict:
        return {n: _TO_HF[self.layout](a) for n, a in zip(self.hf_names, flat[self.ours])}

    def hf_shape(self, our_shapes: dict) -> tuple:
        """Shape of each one of the checkpoint tensors."""
        return _TO_HF[self.layout](np.empty(our_shapes[self.ours][0][1:], np.int8)).shape

    def hf_shapes(self, our_shapes: dict) -> dict[str, tuple]:
        shape = tuple(self.hf_shape(our_shapes))
        return {n: shape for n in self.hf_names}


@dataclass(frozen=True)
class LayoutChoice:
    """The same parameters stored in one of several checkpoint layouts (each a tuple of rules).

    ``options[0]`` is the layout we write; reading picks, per checkpoint, the first option whose
    tensors are all present (else the one with most present, so errors name the closest layout).
    Call `resolve_layouts` on a rule list before reading a checkpoint with it.
    """

    options: tuple[tuple, ...]

    @property
    def hf_names(self) -> tuple[str, ...]:
        return tuple(n for r in self.options[0] for n in r.hf_names)

    @property
    def our_names(self) -> tuple[str, ...]:
        return tuple(n for r in self.options[0] for n in r.our_names)

    def to_hf(self, flat: dict) -> dict:
        out = {}
        for r in self.options[0]:
            out.update(r.to_hf(flat))
        return out

    def to_ours(self, tensors: dict) -> dict:
        out = {}
        for r in self.pick(tensors):
            out.update(r.to_ours(tensors))
        return out

    def hf_shapes(self, our_shapes: dict) -> dict[str, tuple]:
        return {n: s for r in self.options[0] for n, s in hf_shapes(r, our_shapes).items()}

    def pick(self, names) -> tuple:
        present = [sum(n in names for r in opt for n in r.hf_names) for opt in self.options]
        for opt, count in zip(self.options, present):
            if count == sum(len(r.hf_names) for r in opt):
                return tuple(resolve_layouts(opt, names))
        return tuple(resolve_layouts(self.options[present.index(max(present))], names))


def resolve_layouts(rules, names) -> list:
    """Replace every `LayoutChoice` in ``rules`` by the rules of the layout the checkpoint uses
    (``names``: the checkpoint's tensor names, or its tensor dict)."""
    out = []
    for r in rules:
        out.extend(r.pick(names) if isinstance(r, LayoutChoice) else (r,))
    return out


def rename_hf(rule, fn):
    """``rule`` with every checkpoint name (template) passed through ``fn``."""
    if isinstance(rule, LayoutChoice):
        return LayoutChoice(tuple(tuple(rename_hf(r, fn) for r in opt) for opt in rule.options))
    return dataclasses.replace(rule, hf=fn(rule.hf))


def with_prefix_alias(rules, prefix: str, alias: str) -> list:
    """Rules that write names starting with ``prefix`` and also read them with ``alias`` instead
    (e.g. ``model.`` written, ``backbone.`` accepted)."""
    swap = lambda name: alias + name[len(prefix):] if name.startswith(prefix) else name
    out = []
    for r in rules:
        other = rename_hf(r, swap)
        if other == r:
            out.append(r)
        else:
            primary = r.options if isinstance(r, LayoutChoice) else ((r,),)
            aliased = other.options if isinstance(other, LayoutChoice) else ((other,),)
            out.append(LayoutChoice(primary + aliased))
    return out
