"""Named variants of the method for comparisons and ablations: presets over HDMLConfig fields, plus overrides.

A preset sets the method's switches it is named after; every other field (α, β, λ, the loss, the embedding size...)
comes from the base configuration, i.e. the flags or flagfile of the tool. The HDML presets start from the paper's
switches (`PAPER`) and change one thing each, so a difference against `hdml` is the effect of that one thing:

| preset | changes | what it isolates |
|---|---|---|
| `baseline` | hdml=false | the plain metric loss, nothing synthetic |
| `hdml` | — (the paper) | adaptive pull e^(−α/J_avg), J_gen = J_recon + J_soft |
| `hdml_no_hardness` | pull=none | synthetic negatives are the generator's reconstruction of the real ones (factor 1) |
| `hdml_fixed_hardness` | pull=fixed | a constant pull factor (`fixed_pull`, 0.5) instead of the adaptive one |
| `hdml_no_softmax` | gen_lambda=0 | the generator is trained by J_recon alone (λ = 0) |
| `hdml_no_recon` | gen_lambda=1 | the generator is trained by J_soft alone (λ = 1) |

A variant is written `PRESET` or `PRESET+FIELD=VALUE+FIELD=VALUE` (any HDMLConfig field, e.g. `hdml+alpha=9` or
`hdml_fixed_hardness+fixed_pull=0.2`); the text is also its name (and its directory in a comparison).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Dict, List, Sequence, Tuple

from hdml_tf.config import HDMLConfig
from hdml_tf.errors import ConfigError

#: The paper's switches, which every HDML preset starts from (fields a preset may change).
PAPER: Dict[str, object] = {"hdml": True, "pull": "adaptive"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of HDMLConfig values (`method`) and one line saying what it is."""

    name: str
    description: str
    method: Tuple[Tuple[str, object], ...]


def _preset(name: str, description: str, **changes) -> Preset:
    base = {} if changes.get("hdml") is False else dict(PAPER)
    return Preset(name, description, tuple({**base, **changes}.items()))


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    _preset("baseline", "the plain metric loss without HDML", hdml=False),
    _preset("hdml", "the paper: adaptive pull factor e^(-alpha/J_avg), generator trained by J_recon + J_soft"),
    _preset("hdml_no_hardness", "pull factor 1: synthetic negatives are the generator's reconstruction of the real "
                                "ones", pull="none"),
    _preset("hdml_fixed_hardness", "a constant pull factor (fixed_pull) instead of e^(-alpha/J_avg)", pull="fixed"),
    _preset("hdml_no_softmax", "lambda = 0: the generator is trained by J_recon only", gen_lambda=0.0),
    _preset("hdml_no_recon", "lambda = 1: the generator is trained by J_soft only", gen_lambda=1.0),
)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A preset with optional overrides; `name` is its spec text (`PRESET+FIELD=VALUE...`)."""

    name: str
    preset: Preset
    overrides: Tuple[Tuple[str, object], ...] = ()

    def config(self, base: HDMLConfig) -> HDMLConfig:
        """The method of this variant: `base` with the preset's values, then the overrides (ConfigError if invalid)."""
        try:
            return dataclasses.replace(base, **{**dict(self.preset.method), **dict(self.overrides)})
        except ConfigError as e:
            raise ConfigError(f"variant {self.name}: {e}") from None

    def changes(self) -> Dict[str, object]:
        """Every HDMLConfig field this variant sets (preset, then overrides)."""
        return {**dict(self.preset.method), **dict(self.overrides)}

    def describe(self) -> str:
        """One line: the preset's description and the overrides."""
        extra = ", ".join(f"{k}={v}" for k, v in self.overrides)
        return self.preset.description + (f" [{extra}]" if extra else "")


def _parse_value(field: str, text: str, kind) -> object:
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    raise ValueError(f"field {field} cannot be set in a variant")


def parse_variant(spec: str) -> Variant:
    """`PRESET` or `PRESET+FIELD=VALUE+...` → Variant.

    Raises:
      ConfigError: unknown preset or field, or a value of the wrong type (the message names the spec).
    """
    spec = spec.strip()
    preset_name, *parts = spec.split("+")
    if preset_name not in PRESETS:
        raise ConfigError(f"variant {spec!r}: unknown preset {preset_name!r}; expected one of {', '.join(PRESETS)} "
                          "(optionally followed by +FIELD=VALUE)")
    hints = typing.get_type_hints(HDMLConfig)
    overrides = []
    for part in parts:
        field, sep, text = part.partition("=")
        if not sep or field not in hints:
            raise ConfigError(f"variant {spec!r}: {part!r} is not FIELD=VALUE with FIELD an HDMLConfig field "
                              f"({', '.join(hints)})")
        try:
            overrides.append((field, _parse_value(field, text, hints[field])))
        except ValueError as e:
            raise ConfigError(f"variant {spec!r}: {field}={text!r}: {e}") from None
    return Variant(spec, PRESETS[preset_name], tuple(overrides))


def parse_variants(specs: Sequence[str]) -> List[Variant]:
    """Several specs; each name once (ConfigError otherwise, or for an empty list)."""
    variants = [parse_variant(s) for s in specs if s.strip()]
    if not variants:
        raise ConfigError(f"no variant given; expected some of {', '.join(PRESETS)}")
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"variant {repeated[0]} is listed twice")
    return variants
