"""A mergekit YAML merge configuration, read and run as mergekit would: the same YAML gives the same tensors.

    python -m alignment.merge config.yml OUTPUT_DIR          (or --config.merge.mergekit_yaml=config.yml)

Model paths are local HF directories, relative ones to the current directory (as mergekit). Each field of
mergekit 0.1.5 maps to ours; anything else is an error naming it:

  merge_method   linear | task_arithmetic | ties | dare_ties | dare_linear | slerp | model_stock
  base_model     the base of the task-vector methods and Model Stock (listed among `models` or not); SLERP's
                 t = 0 end; for linear one more input, as mergekit adds it
  models         [{model: PATH, parameters: {...}}, ...]
  slices         one slice whose sources each span all layers of their model (layer_range [0, L]) is the same
                 as `models`; layer stacking (several slices, partial ranges) and `modules` are not supported
  parameters     top level, per slice and per model; a per-model value wins over the slice's, which wins over
                 the top level's, which wins over the method's default:
      weight       per model -> weights (required where the method takes it: mergekit has no default)
      density      per model -> densities, in (0, 1] (TIES keeps max(1, int(density n)) entries; DARE draws)
      lambda       -> lam
      normalize    -> normalize (default: true for linear and ties, false for task_arithmetic and dare_*)
      rescale      -> rescale: true = 'l1' (restore each task vector's L1 norm), false = 'none' (default: true
                      for dare_*, false for ties)
      int8_mask    accepted: it changes the dtype of mergekit's sign mask, not the numbers
      t            -> t (slerp, required)
      filter_wise  model_stock: false only (per-row angles are not supported)
    A value is a number (or true/false), a list of numbers (a gradient over depth, linearly interpolated at
    mergekit's position: layer / (L - 1) in the layers, 1 with one layer, 0 for the embeddings, final norm and
    lm_head), or [{filter: S, value: V}, ...]: the first entry whose filter is a substring of the HF tensor name
    (no filter, or '*', matches all); where none matches, the next level decides. A filter that is part of
    no tensor name is an error (a typo; mergekit would ignore it). A parameter the method does not take is ignored with
    a warning, as mergekit ignores it.
  dtype, out_dtype  out_dtype (else dtype) is the dtype written; we compute in float32 from the stored values,
                 where mergekit computes TIES, DARE, task arithmetic and Model Stock in `dtype`: identical for
                 float32, within that dtype's rounding for float16/bfloat16
  tokenizer_source  accepted where every input has the same tokenizer files (mergekit's vocabulary alignment is
                 then the identity); the tokenizer files are copied from it ('base': the base), else from the
                 base or the first model when it has them (mergekit's default); `tokenizer` and
                 `chat_template` are not supported

DARE's draws are the project's hash of (seed, tensor, layer, model), not torch's generator: DARE merges
equal mergekit's in distribution, and exactly where density is 1.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping, Sequence

import yaml

from alignment.config import suggest
from alignment.data import tokenizer_files
from alignment.merge import checkpoint_io
from alignment.merge.methods import TensorParams
from alignment.merge.streaming import merge_checkpoints
from alignment.models import hf
from alignment.models.config import from_hf_config

logger = logging.getLogger(__name__)

REQUIRED = "required"  # a parameter with no default
# mergekit's parameters per method: name -> (scope, type, default). 'model' parameters have a value per input
# model (never for the base of a method that has one); 'shared' ones one value per tensor.
_TASK_VECTOR = {"weight": ("model", float, REQUIRED), "density": ("model", float, 1.0),
                "lambda": ("shared", float, 1.0), "int8_mask": ("shared", bool, False)}
PARAMETERS: dict[str, dict[str, tuple[str, type, Any]]] = {
    "linear": {"weight": ("model", float, REQUIRED), "normalize": ("shared", bool, True)},
    "task_arithmetic": {**_TASK_VECTOR, "normalize": ("shared", bool, False), "rescale": ("shared", bool, False)},
    "ties": {**_TASK_VECTOR, "normalize": ("shared", bool, True), "rescale": ("shared", bool, False)},
    "dare_ties": {**_TASK_VECTOR, "normalize": ("shared", bool, False), "rescale": ("shared", bool, True)},
    "dare_linear": {**_TASK_VECTOR, "normalize": ("shared", bool, False), "rescale": ("shared", bool, True)},
    "slerp": {"t": ("shared", float, REQUIRED)},
    "model_stock": {"filter_wise": ("shared", bool, False)},
}
_FIELDS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
           "tokenizer_source", "tokenizer", "chat_template")
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


# ----------------------------------------------------------------------------- parameter values


def position(layer: int | None, num_layers: int) -> float:
    """mergekit's gradient position of a tensor: layer / (L - 1) in the layers (1 with one layer), else 0."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """A parameter setting's value for the HF tensor named `tensor` at gradient position t; None where it is a
    list of conditional entries none of which applies."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(entry, Mapping) for entry in setting):  # a gradient
        scaled = t * (len(setting) - 1)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(scaled)]
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    for entry in setting:
        if entry.get("filter") in (None, "*") or entry["filter"] in tensor:
            return evaluate(entry["value"], tensor, t)
    return None


def _check_setting(setting: Any, kind: type, where: str, filters: set, low: float | None = None) -> None:
    """Raise ValueError naming `where` unless `setting` is a well-formed value of `kind`, numbers in (low, 1] when
    low is given (filters collected)."""
    def scalar(v):
        ok = isinstance(v, bool) if kind is bool else isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise ValueError(f"{where}: {v!r} is not a {'boolean' if kind is bool else 'number'}")
        if low is not None and not low < v <= 1:
            raise ValueError(f"{where}: {v!r} must lie in ({low}, 1]")

    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return scalar(setting)
    if all(not isinstance(entry, Mapping) for entry in setting):
        for v in setting:
            scalar(v)
        return
    for i, entry in enumerate(setting):
        if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise ValueError(f"{where}[{i}]: a conditional value is {{filter: NAME, value: V}}, got {entry!r}")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise ValueError(f"{where}[{i}].filter: a substring of tensor names, got {entry['filter']!r}")
        if entry.get("filter") not in (None, "*"):
            filters.add(entry["filter"])
        _check_setting(entry["value"], kind, f"{where}[{i}].value", filters, low)


@dataclasses.dataclass(frozen=True)
class MergekitParams:
    """Per-tensor `TensorParams` by mergekit's rules (the `spec` of `merge_checkpoints`).

    shared: parameter dicts for one-per-tensor values, highest precedence first (slice, top level);
    per_model: for each of our models, its dicts (its own, slice, top level); labels name the models in errors;
    hf_names: (project name, layer) -> HF tensor name, what filters are matched against.
    """

    method: str
    shared: tuple[Mapping[str, Any], ...]
    per_model: tuple[tuple[Mapping[str, Any], ...], ...]
    labels: tuple[str, ...]
    hf_names: Mapping[tuple[str, int | None], str]
    filters: frozenset[str]

    def _value(self, name: str, settings: Sequence[Mapping[str, Any]], tensor: str, t: float, label: str) -> Any:
        for setting in settings:
            if name in setting and (value := evaluate(setting[name], tensor, t)) is not None:
                return value
        default = PARAMETERS[self.method][name][2]
        if default is REQUIRED:
            raise ValueError(f"{label}: parameter {name!r} is required by {self.method} for tensor {tensor} "
                             "(mergekit has no default for it)")
        return default

    def resolve(self, name: str, layer: int | None, num_layers: int) -> TensorParams:
        tensor, t = self.hf_names[(name, layer)], position(layer, num_layers)
        taken = PARAMETERS[self.method]
        shared = {p: self._value(p, self.shared, tensor, t, "parameters") for p, (scope, _, _) in taken.items()
                  if scope == "shared"}
        per_model = [{p: self._value(p, settings, tensor, t, label) for p, (scope, _, _) in taken.items()
                      if scope == "model"} for settings, label in zip(self.per_model, self.labels)]
        values: dict[str, Any] = dict(weights=tuple(float(m.get("weight", 1.0)) for m in per_model))
        if "density" in taken:
            values["densities"] = tuple(float(m["density"]) for m in per_model)
            values["lam"] = float(shared["lambda"])
            values["rescale"] = "l1" if shared["rescale"] else "none"
        if "normalize" in shared:
            values["normalize"] = shared["normalize"]
        if "t" in shared:
            values["t"] = float(shared["t"])
        if shared.get("filter_wise"):
            raise ValueError("parameters.filter_wise: Model Stock's per-row angles (filter_wise: true) are not "
                             "supported")
        return TensorParams(**values)

    def unmatched_patterns(self, names: Sequence[str]) -> list[str]:
        """Filters that are a substring of no HF tensor name of `names` (almost always a typo)."""
        tensors = [hf_name for (name, _), hf_name in self.hf_names.items() if name in names]
        return sorted(f for f in self.filters if not any(f in tensor for tensor in tensors))


# ----------------------------------------------------------------------------- the configuration


@dataclasses.dataclass(frozen=True)
class MergekitMerge:
    """What a mergekit YAML asks for, in `merge_checkpoints`' terms."""

    path: str  # the YAML file
    method: str
    models: tuple[str, ...]
    base: str  # '' for linear and slerp (ours take no base)
    spec: MergekitParams
    out_dtype: str  # '' = the inputs'
    tokenizer_from: str  # HF directory whose tokenizer files go with the output ('' = none)

    def run(self, hf_output: str = "", output: str = "", **kwargs) -> dict[str, Any]:
        """`merge_checkpoints` with this merge; kwargs: its other arguments (seed, overwrite, workers, ...)."""
        return merge_checkpoints(list(self.models), self.method, base=self.base, output=output, hf_output=hf_output,
                                 spec=self.spec, out_dtype=self.out_dtype,
                                 tokenizer_from=self.tokenizer_from if hf_output else "", **kwargs)


def _model_path(reference: Any, where: str) -> str:
    if not isinstance(reference, str):
        raise ValueError(f"{where}: a model path, got {reference!r}")
    if not os.path.isfile(os.path.join(reference, "config.json")):
        hint = (" (a LoRA reference `model+lora`: merge the adapter into the model first)" if "+" in reference
                else " (Hugging Face Hub ids are not downloaded: fetch the model first, e.g. with "
                     "`huggingface-cli download`, and name its directory)")
        raise ValueError(f"{where}: {reference!r} is not a local HF model directory with a config.json{hint}")
    return os.path.normpath(reference)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: a mapping of parameter names to values, got {value!r}")
    return dict(value)


def _inputs(config: Mapping[str, Any]) -> tuple[list[tuple[str, dict, str]], dict, Any]:
    """([(model path, its parameters, where it is in the YAML)], slice parameters, base reference) of `models` or
    of the one full-depth slice."""
    if config.get("modules") is not None:
        raise ValueError("modules: per-module merges are not supported; use `models`")
    if (config.get("models") is None) == (config.get("slices") is None):
        raise ValueError("give exactly one of `models` and `slices`")
    if config.get("models") is not None:
        entries = config["models"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("models: a non-empty list of {model: PATH, parameters: {...}}")
        inputs = []
        for i, entry in enumerate(entries):
            entry = {"model": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise ValueError(f"models[{i}]: {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            path = _model_path(entry["model"], f"models[{i}].model")
            inputs.append((path, _mapping(entry.get("parameters"), f"models[{i}].parameters"), f"models[{i}]"))
        return inputs, {}, config.get("base_model")
    slices = config["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        raise ValueError("slices: only one slice spanning every layer is supported (layer stacking is not)")
    (out_slice,) = slices
    unknown = set(out_slice) - {"sources", "base_model", "parameters"}
    if unknown:
        raise ValueError(f"slices[0].{sorted(unknown)[0]}: not supported")
    inputs = []
    for i, source in enumerate(out_slice.get("sources") or []):
        where = f"slices[0].sources[{i}]"
        if not isinstance(source, Mapping) or set(source) - {"model", "layer_range", "parameters"}:
            raise ValueError(f"{where}: {{model: PATH, layer_range: [0, L], parameters: {{...}}}}, got {source!r}")
        path = _model_path(source.get("model"), f"{where}.model")
        layers = from_hf_config(path).num_layers
        if list(source.get("layer_range") or []) != [0, layers]:
            raise ValueError(f"{where}.layer_range: {source.get('layer_range')!r} is not all of {path}'s layers "
                             f"[0, {layers}]; layer stacking is not supported")
        inputs.append((path, _mapping(source.get("parameters"), f"{where}.parameters"), where))
    if not inputs:
        raise ValueError("slices[0].sources: empty")
    return inputs, _mapping(out_slice.get("parameters"), "slices[0].parameters"), \
        out_slice.get("base_model", config.get("base_model"))


def _check_parameters(method: str, levels: Sequence[tuple[str, Mapping[str, Any], bool]]) -> set:
    """Check every parameter's values; warn about those mergekit would ignore. levels: (where, parameters,
    per-model level). Returns the filters used."""
    filters: set = set()
    for where, parameters, per_model in levels:
        for name, setting in parameters.items():
            if name not in PARAMETERS[method]:
                logger.warning("%s.%s: %s takes no parameter %r; it is ignored (as mergekit ignores it).%s",
                               where, name, method, name, suggest(name, PARAMETERS[method]))
                continue
            scope, kind, _ = PARAMETERS[method][name]
            if per_model and scope == "shared":
                logger.warning("%s.%s: %s is one value for all models; mergekit ignores it in a model's "
                               "parameters, and so do we", where, name, name)
                continue
            _check_setting(setting, kind, f"{where}.{name}", filters, 0.0 if name == "density" else None)
    return filters


def _shares_tokenizer(paths: Sequence[str]) -> bool:
    """Whether every directory holds the same vocabulary files, byte for byte."""
    def files(path):
        out = {}
        for name in _VOCABULARY_FILES:
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name), "rb") as f:
                    out[name] = f.read()
        return out

    first = files(paths[0])
    return bool(first) and all(files(p) == first for p in paths[1:])


def _tokenizer_from(config: Mapping[str, Any], paths: Sequence[str], base: str) -> str:
    for field in ("tokenizer", "chat_template"):
        if config.get(field) is not None:
            raise ValueError(f"{field}: not supported (the tokenizer is copied from the base or first model)")
    source = config.get("tokenizer_source")
    if source is None:
        donor = base or paths[0]
        return donor if any(os.path.isfile(os.path.join(donor, n)) for n in tokenizer_files.TOKENIZER_FILES) else ""
    if not _shares_tokenizer(paths):
        raise ValueError(f"tokenizer_source: {source!r} asks mergekit to align the vocabularies of the inputs, "
                         "which do not all have the same tokenizer files; only that case (no alignment) is supported")
    if source in ("base", "union"):
        return base or paths[0]
    return _model_path(source, "tokenizer_source")


def load_mergekit_yaml(path: str) -> MergekitMerge:
    """Read and check a mergekit YAML file; ValueError naming the field for anything unsupported or malformed."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"mergekit config not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    try:
        return _plan(path, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _plan(path: str, config: Any) -> MergekitMerge:
    if not isinstance(config, Mapping):
        raise ValueError("a mergekit merge configuration is a mapping with merge_method and models")
    for key in config:
        if key not in _FIELDS:
            raise ValueError(f"{key}: not a field of a mergekit merge configuration.{suggest(str(key), _FIELDS)}")
    method = config.get("merge_method")
    if method not in PARAMETERS:
        raise ValueError(f"merge_method: {method!r} is not supported.{suggest(str(method), PARAMETERS)} "
                         f"Supported: {sorted(PARAMETERS)}")
    inputs, slice_parameters, base_reference = _inputs(config)
    top = _mapping(config.get("parameters"), "parameters")
    base = _model_path(base_reference, "base_model") if base_reference is not None else ""
    paths = [p for p, _, _ in inputs]
    if len(set(paths)) != len(paths):
        raise ValueError("models: a model is listed twice")
    if method == "linear" and base and base not in paths:
        inputs.append((base, {}, "base_model"))  # mergekit merges the base as one more input
    if method in ("linear",):
        ours, our_base = inputs, ""
    else:
        if not base:
            raise ValueError(f"base_model: {method} needs one")
        ours, our_base = [entry for entry in inputs if entry[0] != base], base
        if method == "slerp":
            if len(ours) != 1:
                raise ValueError(f"models: slerp interpolates the base and one other model, got {len(ours)} others")
            ours, our_base = [(base, {}, "base_model"), *ours], ""
        elif method == "model_stock" and len(ours) < 2:
            raise ValueError("models: model_stock needs the base and at least two other models")
    levels = [*((f"{where}.parameters", p, True) for _, p, where in inputs),
              ("slices[0].parameters", slice_parameters, False), ("parameters", top, False)]
    filters = _check_parameters(method, levels)
    out_dtype = config.get("out_dtype") or config.get("dtype") or ""
    out_dtype = out_dtype.removeprefix("torch.") if isinstance(out_dtype, str) else out_dtype
    if out_dtype and out_dtype not in checkpoint_io.OUT_DTYPES:
        field = "out_dtype" if config.get("out_dtype") else "dtype"
        raise ValueError(f"{field}: {config.get(field)!r}; supported: {checkpoint_io.OUT_DTYPES}")
    model_config = from_hf_config(base or paths[0])
    hf_names = {(key if i is None else f"layers/{key}", i): hf_name
                for hf_name, key, i, _ in hf.hf_entries(model_config)}
    spec = MergekitParams(
        method=method, shared=(slice_parameters, top),
        per_model=tuple((p, slice_parameters, top) for _, p, _ in ours),
        labels=tuple(f"{where} ({p})" for p, _, where in ours), hf_names=hf_names, filters=frozenset(filters))
    unmatched = spec.unmatched_patterns([name for name, _ in hf_names])
    if unmatched:
        shapes = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in hf_names.values()})
        raise ValueError(f"filters {unmatched} are part of no tensor name (mergekit would ignore them; a typo?); "
                         f"the tensors: {shapes}")
    for name, layer in hf_names:  # a required parameter missing for some tensor fails here, naming the file
        spec.resolve(name, layer, model_config.num_layers)
    return MergekitMerge(path=path, method=method, models=tuple(p for p, _, _ in ours), base=our_base, spec=spec,
                         out_dtype=out_dtype, tokenizer_from=_tokenizer_from(config, [*paths, *[base] * bool(base)],
                                                                             base))
