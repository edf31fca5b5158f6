"""LoRA adapters in Hugging Face PEFT's format: `adapter_model.safetensors` + `adapter_config.json`, which
`peft.PeftModel.from_pretrained` loads onto the transformers model of the base checkpoint (and back).

PEFT stores, per layer and projection, lora_A.weight [rank, in_features] and lora_B.weight [out_features, rank]
under `base_model.model.model.layers.{i}.<self_attn|mlp>.<name>.lora_{A,B}.weight`; in/out features are the
kernel's input and output axes flattened in the order models/hf.py converts the kernels, so A [layers, *in, rank]
and B [layers, rank, *out] map by a reshape and a transpose per layer.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from alignment.models.lora import PROJECTIONS, LoraSpec

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _key(layer: int, name: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_MODULE[name]}.{name}.lora_{which}.weight"


def export_peft(directory: str, trainable: dict, spec: LoraSpec, base_model: str = "") -> None:
    """Write the adapters of `trainable` ({"lora": {"layers": {name: {"a", "b"}}}}) as a PEFT LoRA adapter."""
    from safetensors.numpy import save_file

    adapters = trainable["lora"]["layers"]
    tensors = {}
    for name, ab in adapters.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(a.shape[0]):
            tensors[_key(i, name, "A")] = np.ascontiguousarray(a[i].reshape(-1, spec.rank).T)
            tensors[_key(i, name, "B")] = np.ascontiguousarray(b[i].reshape(spec.rank, -1).T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
              "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
              "target_modules": sorted(adapters), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def import_peft(directory: str, abstract_kernels: dict[str, Any]) -> tuple[dict, LoraSpec]:
    """(trainable {"lora": ...}, spec) from a PEFT LoRA adapter directory. abstract_kernels: the base model's
    layer kernels by name (anything with .shape [layers, *in, *out]), which give the adapters their axes."""
    from safetensors.numpy import load_file

    config_path = os.path.join(directory, CONFIG_FILE)
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{config_path}: {key} is not supported")
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: bias adapters and fan_in_fan_out are not supported")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"{config_path}: target_modules {unknown} are not projections of this model "
                         f"({', '.join(PROJECTIONS)})")
    rank = int(config["r"])
    spec = LoraSpec(targets="layers/(" + "|".join(sorted(targets)) + ")", rank=rank,
                    alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                    rslora=bool(config.get("use_rslora", False)))
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    layers = {}
    for name in sorted(targets):
        shape = tuple(abstract_kernels[name].shape)
        n_in = PROJECTIONS[name]
        try:
            a = np.stack([tensors[_key(i, name, "A")].T.reshape(*shape[1: 1 + n_in], rank) for i in range(shape[0])])
            b = np.stack([tensors[_key(i, name, "B")].T.reshape(rank, *shape[1 + n_in:]) for i in range(shape[0])])
        except KeyError as e:
            raise ValueError(f"{directory}/{WEIGHTS_FILE}: tensor {e.args[0]} is missing") from None
        except ValueError as e:
            raise ValueError(f"{directory}/{WEIGHTS_FILE}: {name} adapters do not fit the base model ({e})") from None
        layers[name] = {"a": a, "b": b}
    return {"lora": {"layers": layers}, "full": {}}, spec
