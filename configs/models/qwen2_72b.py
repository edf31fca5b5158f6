"""Qwen2-72B shapes."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        vocab_size=152064,
        hidden_size=8192,
        intermediate_size=29568,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=False,
        max_position_embeddings=32768,
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat_policy="full",
        remat_group_size=2,
    ))
