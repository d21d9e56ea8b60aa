"""LoRAConfig: the hyper-parameters of one LoRA adapter, validated on construction."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

BIAS_CHOICES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"

TargetSpec = Union[None, str, Sequence[str]]
Pattern = Union[Mapping[str, Any], Sequence[tuple[str, Any]]]


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter (field names follow the math, peft's names in comments).

    ``target_modules``:
      - ``None``: the registry default for ``model.config.model_type`` (see ``lora.targets``);
      - a list/tuple: a module matches when its full name equals an entry or ends with ``"." + entry``;
      - a ``str``: a regular expression that must ``re.fullmatch`` the full module name;
      - ``"all-linear"``: every linear-like layer except the output head.
    """

    # rank of the update B @ A (peft: r); A is [r, in], B is [out, r]
    r: int = 8
    # numerator of the scaling: alpha / r, or alpha / sqrt(r) with use_rslora (peft: lora_alpha)
    alpha: float = 8
    # dropout probability on the LoRA branch input only (peft: lora_dropout)
    dropout: float = 0.0
    # which linear-like modules get an adapter; see the class docstring
    target_modules: TargetSpec = None
    # rank-stabilized scaling alpha / sqrt(r)
    use_rslora: bool = False
    # weight-decomposed LoRA: a trainable per-output-row magnitude m
    use_dora: bool = False
    # which biases train and are saved: "none", "all" (every *.bias), "lora_only" (wrapped layers)
    bias: str = "none"
    # modules (exact name or dotted suffix) that get a trainable full copy, e.g. ("classifier",)
    modules_to_save: Sequence[str] = ()
    # per-module rank: {regex: r}; the first key whose regex matches the end of a dotted module
    # name wins (peft: rank_pattern); kept as a tuple of (key, r) pairs in the given order
    rank_pattern: Pattern = ()
    # per-module alpha, matched like rank_pattern (peft: alpha_pattern)
    alpha_pattern: Pattern = ()
    # only modules inside these layer indices get an adapter (an int or a list; peft's name)
    layers_to_transform: Union[None, int, Sequence[int]] = None
    # the name(s) of the layer list whose index layers_to_transform reads, e.g. "layers" or "h";
    # None: the first numbered segment of the module name (peft's name)
    layers_pattern: Union[None, str, Sequence[str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r={self.r!r}: expected a positive int")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: expected a finite number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: expected a float in [0, 1)")
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r}: expected a bool")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoRAConfig.bias={self.bias!r}: expected one of {BIAS_CHOICES}")
        object.__setattr__(self, "modules_to_save", _check_names("modules_to_save", self.modules_to_save))
        object.__setattr__(self, "rank_pattern", _check_pattern("rank_pattern", self.rank_pattern, _is_rank))
        object.__setattr__(self, "alpha_pattern", _check_pattern("alpha_pattern", self.alpha_pattern, _is_alpha))
        object.__setattr__(self, "layers_to_transform", _check_layers(self.layers_to_transform))
        pattern = self.layers_pattern
        if pattern is not None and not isinstance(pattern, str):
            pattern = _check_names("layers_pattern", pattern)
        object.__setattr__(self, "layers_pattern", pattern or None)
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR and (
                self.layers_to_transform is not None or self.layers_pattern is not None):
            raise ValueError(f"LoRAConfig.layers_to_transform/layers_pattern cannot be used with a regex "
                             f"target_modules={self.target_modules!r} (put the layer indices in the regex)")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError(f"LoRAConfig.layers_pattern={self.layers_pattern!r} needs layers_to_transform")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: its ``rank_pattern`` entry, else ``r``."""
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name``: its ``alpha_pattern`` entry, else ``alpha``."""
        return pattern_value(self.alpha_pattern, name, self.alpha)


def pattern_value(pairs: Sequence[tuple[str, Any]], name: str, default: Any) -> Any:
    """peft's rule: the first key whose regex ``(.*\\.)?(key)$`` matches ``name`` gives the value."""
    for key, value in pairs:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_alpha(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_pattern(field: str, pattern: Optional[Pattern], ok) -> tuple[tuple[str, Any], ...]:
    if pattern is None:
        return ()
    pairs = tuple(pattern.items()) if isinstance(pattern, Mapping) else pattern
    if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)):
        raise ValueError(f"LoRAConfig.{field}={pattern!r}: expected a dict {{module regex: value}}")
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            raise ValueError(f"LoRAConfig.{field}: entry {pair!r} is not a (non-empty regex, value) pair")
        key, value = pair
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"LoRAConfig.{field}: key {key!r} is not a valid regular expression ({err})")
        if not ok(value):
            kind = "a positive int" if field == "rank_pattern" else "a finite number > 0"
            raise ValueError(f"LoRAConfig.{field}[{key!r}]={value!r}: expected {kind}")
        out.append((key, value))
    return tuple(out)


def _check_layers(layers: Union[None, int, Sequence[int]]) -> Union[None, int, tuple[int, ...]]:
    if layers is None:
        return None
    items = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or \
            any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError(f"LoRAConfig.layers_to_transform={layers!r}: expected an int >= 0 or a list of them")
    if not items:
        return None  # peft: an empty list means every layer
    return layers if isinstance(layers, int) else tuple(items)


def _check_targets(spec: TargetSpec, field: str = "target_modules",
                   owner: str = "LoRAConfig") -> Union[None, str, tuple[str, ...]]:
    """None, "all-linear", a valid regex str, or a non-empty tuple of names."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{owner}.{field}={spec!r}: not a valid regular expression ({err})")
        return spec
    names = _check_names(field, spec, owner)
    if not names:
        raise ValueError(f"{owner}.{field}=(): expected None, a regex, 'all-linear' or a non-empty list")
    return names


def _check_names(field: str, names: Optional[Sequence[str]], owner: str = "LoRAConfig") -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise ValueError(f"{owner}.{field}={names!r}: expected a list or tuple of module names")
    out = tuple(sorted(names)) if isinstance(names, (set, frozenset)) else tuple(names)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{owner}.{field}={names!r}: every entry must be a non-empty str, got {name!r}")
    return out
