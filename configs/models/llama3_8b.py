"""Llama-3-8B / 3.1-8B shapes (128k vocabulary, GQA 32/8, llama3 RoPE scaling as in 3.1)."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        param_dtype="float32",
        dtype="auto",  # bf16 compute on TPU, GPU and AMX / AVX512-BF16 CPUs; float32 elsewhere
        remat_policy="dots_no_batch",
        remat_group_size=1,
    ))
