"""The embedded default: a 1M-parameter Llama-style model for the shipped 1024-piece tokenizer."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        max_position_embeddings=512,
        param_dtype="float32",
        dtype="auto",  # bf16 compute where the hardware multiplies bf16 natively (TPU, GPU, AMX / AVX512-BF16 CPUs)
        attention_impl="xla",
        remat_policy="none",
        remat_group_size=1,
        scan_layers=True,
    ))
