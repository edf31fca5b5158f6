"""bench_decode_bound's per-step traffic, counted by hand for a small Llama shape."""
from alignment.models.config import ModelConfig
from benchmarks.bench_decode_bound import step_traffic


def test_step_traffic_counts_weights_the_batch_rows_and_the_cache():
    config = ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4)
    attention = 16 * 4 * 4 + 2 * 16 * 2 * 4 + 4 * 4 * 16  # q, k and v, o
    mlp = 3 * 16 * 32
    weights = 2 * (attention + mlp) + 100 * 16  # layers and the output head (norm scales are not multiplied by)
    norms = 2 * 2 * 16 + 16
    batch, context, size = 3, 10, 2
    kv = batch * context * 2 * 2 * 2 * 4  # rows x tokens x (k, v) x layers x kv heads x head_dim
    read, flops = step_traffic(config, batch, context, size, size)
    assert read == (weights + norms + batch * 16) * size + kv * size
    assert flops == 2 * weights * batch
