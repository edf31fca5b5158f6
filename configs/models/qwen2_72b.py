"""Qwen2-72B shapes: the 7B preset, widened and deepened."""
from alignment.config import model_preset


def get_config():
    c = model_preset("qwen2_7b")
    c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads = 8192, 29568, 80, 64, 8
    c.param_dtype = "bfloat16"
    c.remat_policy, c.remat_group_size = "full", 2
    return c
