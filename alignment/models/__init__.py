"""Model definitions: one decoder for Llama-2/3 and Qwen2, its config, and HF conversion."""
from alignment.models.config import ModelConfig, RopeScaling, from_hf_config, to_hf_config

__all__ = ["ModelConfig", "RopeScaling", "Transformer", "from_hf_config", "to_hf_config"]


def __getattr__(name: str):
    # The decoder imports JAX and Flax (seconds); configs and safetensors (a merge of HF checkpoints) need neither.
    if name == "Transformer":
        from alignment.models.transformer import Transformer
        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
