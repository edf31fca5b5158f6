"""Model definitions: one decoder for Llama-2/3 and Qwen2, its config, and HF conversion."""
from alignment.models.config import ModelConfig, RopeScaling, from_hf_config, to_hf_config
from alignment.models.transformer import Transformer

__all__ = ["ModelConfig", "RopeScaling", "Transformer", "from_hf_config", "to_hf_config"]
