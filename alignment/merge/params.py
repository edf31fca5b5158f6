"""Per-tensor merge parameters: defaults, overrides by tensor-name pattern, anchors interpolated over depth.

Tensor names are project parameter paths ('embed', 'layers/q_proj', 'final_norm', 'lm_head') whatever
the checkpoint format. A value is a number (or a string/bool option) or a sequence of numbers: anchors
spread evenly over depth and linearly interpolated, e.g. density=(0.2, 0.8) goes from 0.2 at the
first layer to 0.8 at the last. Depth is 0 for 'embed', layer / (num_layers - 1) inside the stacked
'layers/*' tensors, and 1 for the tensors after the stack. `weights` and `densities` have one value per
model, each a number or anchors. Overrides are (regex, values) pairs searched in the tensor name; for
every field the first matching override that sets it wins, else the default. (A mergekit YAML is
resolved by mergekit's own rules instead: `alignment.merge.mergekit_yaml`.)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from alignment.config import suggest
from alignment.merge.methods import METHODS, TensorParams

FIELDS = tuple(f.name for f in dataclasses.fields(TensorParams))
_CHOICES = {"rescale": ("none", "inverse", "l1"), "election": ("sum", "count")}
_PER_MODEL = ("weights", "densities")  # one value (a number or anchors) per model
_BOOLEANS = ("normalize", "clamp_cosine")


def depth(name: str, layer: int | None, num_layers: int) -> float:
    """Position of a tensor in the network, 0 (embedding) to 1 (output head)."""
    if layer is not None:
        return layer / (num_layers - 1) if num_layers > 1 else 0.0
    return 0.0 if name == "embed" else 1.0


def at_depth(value: Any, d: float) -> Any:
    """A scalar as is; anchors (a sequence) linearly interpolated at depth d in [0, 1]."""
    if isinstance(value, (list, tuple)):
        anchors = np.asarray(value, np.float64)
        return float(np.interp(d * (len(anchors) - 1), np.arange(len(anchors)), anchors))
    return value


def _numbers(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [value]


def _check(field: str, value: Any, num_models: int, where: str) -> None:
    """Raise ValueError naming `where` and the field for a value out of range or of the wrong form."""
    if field in _PER_MODEL:
        if len(value) != num_models:
            raise ValueError(f"{where}: {field} has {len(value)} entries, one per model is needed ({num_models})")
        for v in value:
            _check(field[:-1] if field == "weights" else "density", v, num_models, where)
        return
    if field in _CHOICES:
        if value not in _CHOICES[field]:
            raise ValueError(f"{where}: {field}={value!r}; choose from {_CHOICES[field]}")
        return
    if field in _BOOLEANS:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {field} must be True or False, got {value!r}")
        return
    numbers = _numbers(value)
    if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                              for v in numbers):
        raise ValueError(f"{where}: {field} must be a number or a non-empty list of numbers, got {value!r}")
    if field == "density" and not all(0.0 < v <= 1.0 for v in numbers):
        raise ValueError(f"{where}: density must lie in (0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Validated merge parameters; `resolve` gives the numbers for one tensor slice."""

    defaults: Mapping[str, Any]
    overrides: tuple[tuple[re.Pattern, Mapping[str, Any]], ...]

    def resolve(self, name: str, layer: int | None, num_layers: int) -> TensorParams:
        d = depth(name, layer, num_layers)
        values = {}
        for field in FIELDS:
            value = self.defaults[field]
            for pattern, fields in self.overrides:
                if field in fields and pattern.search(name):
                    value = fields[field]
                    break
            values[field] = tuple(at_depth(v, d) for v in value) if field in _PER_MODEL else at_depth(value, d)
        return TensorParams(**values)

    def unmatched_patterns(self, names: Sequence[str]) -> list[str]:
        """Override patterns that match no tensor (almost always a typo)."""
        return [p.pattern for p, _ in self.overrides if not any(p.search(n) for n in names)]


def make_spec(method: str, num_models: int, values: Mapping[str, Any],
              overrides: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> ParamSpec:
    """Check `values` (field -> value; unset fields take the method's defaults) and `overrides`."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}.{suggest(method, METHODS)} Methods: {sorted(METHODS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(TensorParams) if f.name != "weights"}
    defaults.update(dict(METHODS[method].defaults))
    defaults["weights"] = (1.0,) * num_models

    def checked(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for field, value in fields.items():
            if field not in FIELDS:
                raise ValueError(f"{where}: unknown merge parameter {field!r}.{suggest(field, FIELDS)} "
                                 f"Parameters: {list(FIELDS)}")
            if field in _PER_MODEL and not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}: {field} must be a list with one entry per model, got {value!r}")
            if field in _PER_MODEL and len(value) == 0:
                continue  # () means the default: weight 1 / `density` for every model
            _check(field, value, num_models, where)
            out[field] = tuple(value) if isinstance(value, list) else value
        return out

    defaults.update(checked(values, "merge parameters"))
    compiled = []
    for entry in overrides:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], Mapping)):
            raise ValueError(f"each override must be (pattern, {{field: value}}), got {entry!r}")
        pattern, fields = entry
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"override pattern {pattern!r} is not a valid regular expression: {e}") from None
        compiled.append((regex, checked(fields, f"override {pattern!r}")))
    return ParamSpec(defaults, tuple(compiled))
