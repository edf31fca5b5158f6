"""Llama-3-70B / 3.1-70B shapes: the 8B preset, widened and deepened."""
from alignment.config import model_preset


def get_config():
    c = model_preset("llama3_8b")
    c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads = 8192, 28672, 80, 64
    c.param_dtype = "bfloat16"
    c.remat_policy, c.remat_group_size = "full", 2
    return c
