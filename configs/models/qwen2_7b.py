"""Qwen2-7B shapes (152k vocabulary, q/k/v biases, GQA 28/4, untied head)."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=False,
        max_position_embeddings=32768,
        param_dtype="float32",
        dtype="auto",  # bf16 compute on TPU, GPU and AMX / AVX512-BF16 CPUs; float32 elsewhere
        remat_policy="dots_no_batch",
        remat_group_size=1,
    ))
