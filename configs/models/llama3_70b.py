"""Llama-3-70B / 3.1-70B shapes."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        rope_theta=500000.0,
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat_policy="full",
        remat_group_size=2,
    ))
