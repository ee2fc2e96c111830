"""Model configuration: the stack as a sequence of sublayer kinds plus one config per kind.

Every sublayer is ``x + mixer(norm(x))``. A Mamba LM is ``("mamba1",) * n``; a Jamba decoder layer is
two sublayers (a Mamba or attention mixer, then an MLP or MoE); Megatron/Nemotron-H patterns map one
symbol to one sublayer. Validation happens when the config is built, so a bad field fails early with
its name and value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

LayerKind = Literal["mamba1", "mamba2", "attention", "mlp", "moe"]
LAYER_KINDS: tuple[str, ...] = ("mamba1", "mamba2", "attention", "mlp", "moe")

#: Megatron-LM / Nemotron-H hybrid pattern symbols, one sublayer each.
PATTERN_SYMBOLS: dict[str, str] = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe"}

Activation = Literal["silu", "swiglu", "relu2", "gelu", "gelu_tanh", "geglu"]


#: the ``impl`` values of pallas_kernels' ssd and selective_scan (the Mamba mixers pass theirs to both)
SSM_IMPLS = ("auto", "pallas", "xla", "reference", "pallas_gpu", "pallas_tpu")


def check_ssm_impl(impl: str) -> None:
    if impl not in SSM_IMPLS:
        raise ValueError(f"SSM impl={impl!r}: expected one of {SSM_IMPLS}")


def _check(condition: bool, field_name: str, value, why: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class Mamba1Config:
    """Mamba-1 mixer (selective scan). ``bcdt_norm`` adds RMS norms on dt, B and C before the scan:
    ``"weightless"`` as in FalconMamba, ``"weighted"`` as in Jamba."""

    d_inner: int
    d_state: int = 16
    d_conv: int = 4
    dt_rank: int = 0  # 0: ceil(d_model / 16), resolved by ModelConfig
    conv_bias: bool = True
    proj_bias: bool = False
    bcdt_norm: Literal[None, "weightless", "weighted"] = None
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("d_inner", "d_state", "d_conv"):
            _check(getattr(self, name) > 0, f"mamba1.{name}", getattr(self, name), "must be positive")
        _check(self.dt_rank >= 0, "mamba1.dt_rank", self.dt_rank, "must be >= 0 (0: ceil(d_model / 16))")
        _check(self.bcdt_norm in (None, "weightless", "weighted"), "mamba1.bcdt_norm", self.bcdt_norm,
               "must be None, 'weightless' or 'weighted'")


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 mixer (SSD). ``d_inner = n_heads * head_dim``; B and C have ``n_groups`` groups."""

    n_heads: int
    head_dim: int = 64
    d_state: int = 128
    n_groups: int = 1
    d_conv: int = 4
    conv_bias: bool = True
    proj_bias: bool = False
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, math.inf)
    norm_eps: float = 1e-5

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def __post_init__(self):
        for name in ("n_heads", "head_dim", "d_state", "n_groups", "d_conv", "chunk_size"):
            _check(getattr(self, name) > 0, f"mamba2.{name}", getattr(self, name), "must be positive")
        object.__setattr__(self, "chunk_size", int(self.chunk_size))   # numpy integers from sweeps too
        _check(self.n_heads % self.n_groups == 0, "mamba2.n_groups", self.n_groups,
               f"must divide mamba2.n_heads={self.n_heads}")
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding on the first ``fraction`` of each head's dims (Bamba: partial rotary)."""

    theta: float = 10000.0
    fraction: float = 1.0

    def __post_init__(self):
        _check(0.0 < self.fraction <= 1.0, "attention.rope.fraction", self.fraction, "must be in (0, 1]")


@dataclass(frozen=True)
class AttentionConfig:
    """Causal grouped-query attention; no positional encoding unless ``rope`` is set. ``scale``
    multiplies the scores ``q . k`` (None: ``1 / sqrt(head_dim)``; Granite sets its own)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    rope: RopeConfig | None = None
    scale: float | None = None

    def __post_init__(self):
        for name in ("n_heads", "n_kv_heads", "head_dim"):
            _check(getattr(self, name) > 0, f"attention.{name}", getattr(self, name), "must be positive")
        if self.scale is not None:
            _check(math.isfinite(self.scale) and self.scale > 0, "attention.scale", self.scale,
                   "must be a positive number or None")
            object.__setattr__(self, "scale", float(self.scale))
        _check(self.n_heads % self.n_kv_heads == 0, "attention.n_kv_heads", self.n_kv_heads,
               f"must divide attention.n_heads={self.n_heads}")
        if isinstance(self.rope, dict):
            object.__setattr__(self, "rope", RopeConfig(**self.rope))

    @property
    def softmax_scale(self) -> float:
        """The factor on the scores: ``scale``, or ``1 / sqrt(head_dim)`` when it is None."""
        return self.head_dim ** -0.5 if self.scale is None else self.scale


@dataclass(frozen=True)
class MLPConfig:
    """Feed-forward sublayer. ``swiglu``: gate/up/down (Jamba, Bamba); ``relu2``: up/down with squared
    ReLU (Nemotron-H); ``gelu``: up/down."""

    d_ff: int
    activation: Activation = "swiglu"
    bias: bool = False

    def __post_init__(self):
        _check(self.d_ff > 0, "mlp.d_ff", self.d_ff, "must be positive")
        _check(self.activation in ("swiglu", "relu2", "gelu", "gelu_tanh", "geglu"), "mlp.activation",
               self.activation, "must be one of swiglu, geglu, relu2, gelu, gelu_tanh")


@dataclass(frozen=True)
class MoEConfig:
    """Dropless top-k mixture of experts.

    ``router="softmax"``: probabilities over all experts, top-k of them, renormalised only if
    ``normalize_top_k`` (Jamba: not). ``router="sigmoid"``: DeepSeek-V3 / Nemotron-H style, sigmoid
    scores, a learned-free ``correction_bias`` used for selection only, optional expert groups.
    """

    n_experts: int
    top_k: int
    d_ff: int
    activation: Activation = "swiglu"
    router: Literal["softmax", "sigmoid"] = "softmax"
    normalize_top_k: bool = False
    routed_scaling: float = 1.0
    n_groups: int = 1  # expert groups for group-limited routing (sigmoid router)
    top_k_groups: int = 1
    shared_d_ff: int = 0  # 0: no shared expert
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self):
        _check(self.n_experts > 0, "moe.n_experts", self.n_experts, "must be positive")
        _check(0 < self.top_k <= self.n_experts, "moe.top_k", self.top_k,
               f"must be in [1, moe.n_experts={self.n_experts}]")
        _check(self.d_ff > 0, "moe.d_ff", self.d_ff, "must be positive")
        _check(self.router in ("softmax", "sigmoid"), "moe.router", self.router, "must be softmax or sigmoid")
        _check(self.n_groups > 0, "moe.n_groups", self.n_groups, "must be positive")
        _check(self.shared_d_ff >= 0, "moe.shared_d_ff", self.shared_d_ff, "must be >= 0 (0: no shared expert)")
        _check(self.n_experts % self.n_groups == 0, "moe.n_groups", self.n_groups,
               f"must divide moe.n_experts={self.n_experts}")
        _check(0 < self.top_k_groups <= self.n_groups, "moe.top_k_groups", self.top_k_groups,
               f"must be in [1, moe.n_groups={self.n_groups}]")
        allowed = self.top_k_groups * (self.n_experts // self.n_groups)   # the sigmoid router's group limit
        _check(self.router != "sigmoid" or self.top_k <= allowed, "moe.top_k", self.top_k,
               f"must be at most the {allowed} experts of the moe.top_k_groups={self.top_k_groups} groups chosen "
               f"(the rest are masked out)")
        _check(self.activation in ("swiglu", "relu2", "gelu", "gelu_tanh", "geglu"), "moe.activation",
               self.activation, "must be one of swiglu, geglu, relu2, gelu, gelu_tanh")


#: `ModelConfig`'s muP-style scalars (1.0: off); only Granite checkpoints carry them.
MUP_SCALARS = ("embedding_multiplier", "residual_multiplier", "logits_divisor")

_KIND_CONFIG = {"mamba1": Mamba1Config, "mamba2": Mamba2Config, "attention": AttentionConfig,
                "mlp": MLPConfig, "moe": MoEConfig}


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM: embedding, ``layers`` pre-norm residual sublayers, final norm, LM head."""

    vocab_size: int
    d_model: int
    layers: tuple[str, ...]
    mamba1: Mamba1Config | None = None
    mamba2: Mamba2Config | None = None
    attention: AttentionConfig | None = None
    mlp: MLPConfig | None = None
    moe: MoEConfig | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    residual_in_fp32: bool = True
    #: muP-style scalars (Granite 4.0): the embeddings times ``embedding_multiplier`` start the
    #: residual stream, each sublayer's output joins it times ``residual_multiplier``, and the
    #: logits are divided by ``logits_divisor``.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    #: the model type this config was read from / is written to (``save_pretrained``).
    model_type: str = "jamba_jax"
    #: extra fields of the source config.json that we carry through unchanged (token ids, ...).
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        _check(self.vocab_size > 0, "vocab_size", self.vocab_size, "must be positive")
        _check(self.d_model > 0, "d_model", self.d_model, "must be positive")
        for name in MUP_SCALARS:
            value = getattr(self, name)
            _check(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                   and value > 0, name, value, "must be a positive number")
            object.__setattr__(self, name, float(value))
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        _check(len(layers) > 0, "layers", layers, "must name at least one sublayer")
        for i, kind in enumerate(layers):
            _check(kind in LAYER_KINDS, f"layers[{i}]", kind, f"unknown kind; expected one of {LAYER_KINDS}")
        for kind, cls in _KIND_CONFIG.items():
            sub = getattr(self, kind)
            if isinstance(sub, dict):
                sub = cls(**sub)
                object.__setattr__(self, kind, sub)
            if kind in layers:
                _check(sub is not None, kind, sub, f"layers use {kind!r} sublayers but no {kind} config is given")
        if self.mamba1 is not None and self.mamba1.dt_rank == 0:
            object.__setattr__(self, "mamba1", dataclasses.replace(self.mamba1, dt_rank=math.ceil(self.d_model / 16)))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def period(self) -> int:
        """Length of the shortest repeating unit of ``layers`` (the whole stack if none repeats)."""
        return layer_period(self.layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        _check(not unknown, "ModelConfig", sorted(unknown), "unknown keys")
        if "attention" in d and isinstance(d["attention"], dict) and isinstance(d["attention"].get("rope"), dict):
            d["attention"] = {**d["attention"], "rope": RopeConfig(**d["attention"]["rope"])}
        if "mamba2" in d and isinstance(d["mamba2"], dict) and "dt_limit" in d["mamba2"]:
            d["mamba2"] = {**d["mamba2"], "dt_limit": tuple(d["mamba2"]["dt_limit"])}
        return cls(**d)


def layer_period(layers: tuple[str, ...]) -> int:
    """Smallest ``p`` dividing ``len(layers)`` with ``layers[i] == layers[i % p]`` for all ``i``."""
    n = len(layers)
    for p in range(1, n + 1):
        if n % p == 0 and all(layers[i] == layers[i % p] for i in range(n)):
            return p
    return n


def layers_from_pattern(pattern: str) -> tuple[str, ...]:
    """Megatron-LM hybrid pattern (``M`` Mamba-2, ``*`` attention, ``-`` MLP, ``E`` MoE) to kinds.

    >>> layers_from_pattern("M-M*")
    ('mamba2', 'mlp', 'mamba2', 'attention')
    """
    for i, s in enumerate(pattern):
        _check(s in PATTERN_SYMBOLS, f"pattern[{i}]", s,
               f"unknown symbol in {pattern!r}; expected one of {''.join(PATTERN_SYMBOLS)}")
    return tuple(PATTERN_SYMBOLS[s] for s in pattern)


def jamba_layers(n_layers: int, *, attn_period: int, attn_offset: int, expert_period: int,
                 expert_offset: int, ssm_kind: str = "mamba1") -> tuple[str, ...]:
    """Jamba's periodic layout: decoder layer ``i`` is attention if ``i % attn_period == attn_offset``
    (else an SSM mixer), then MoE if ``i % expert_period == expert_offset`` (else an MLP)."""
    _check(attn_period > 0, "attn_layer_period", attn_period, "must be positive")
    _check(0 <= attn_offset < attn_period, "attn_layer_offset", attn_offset, f"must be in [0, {attn_period})")
    _check(expert_period > 0, "expert_layer_period", expert_period, "must be positive")
    _check(0 <= expert_offset < expert_period, "expert_layer_offset", expert_offset,
           f"must be in [0, {expert_period})")
    _check(n_layers % attn_period == 0, "attn_layer_period", attn_period, f"must divide num_layers={n_layers}")
    _check(n_layers % expert_period == 0, "expert_layer_period", expert_period,
           f"must divide num_layers={n_layers}")
    layers: list[str] = []
    for i in range(n_layers):
        layers.append("attention" if i % attn_period == attn_offset else ssm_kind)
        layers.append("moe" if i % expert_period == expert_offset else "mlp")
    return tuple(layers)
