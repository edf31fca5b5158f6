"""Full fine-tuning vs LoRA vs QLoRA (int8, nf4) SFT steps: median step time, tokens/s and peak RSS, one process
per mode (so each peak RSS is that mode's own). Prints one JSON line per mode.

    python -m benchmarks.bench_lora --model=tiny            # the embedded tiny model (no shared data needed)
    python -m benchmarks.bench_lora --model=bench-small     # ../shared/data/peers/bench-small/config.json
    python -m benchmarks.bench_lora --model=1b --dtype=bfloat16 --batch=1 --seq=128 --steps=2
    ~/.cache/alignment-peers/trl/bin/python benchmarks/peer_lora_trl.py   # the TRL + PEFT peer, same rows and rank
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

MODES = ("full", "lora", "qlora_int8", "qlora_nf4")


def measure(model_name: str, mode: str, batch: int, seq: int, steps: int, dtype: str) -> dict:
    import dataclasses
    import functools

    import jax
    import numpy as np

    from alignment.algorithms.sft import sft_loss
    from alignment.config import load_config_file
    from alignment.models import ModelConfig, Transformer
    from alignment.models.transformer import dummy_inputs
    from alignment.train import adapters, runtime
    from alignment.train.optimizer import make_optimizer
    from alignment.train.state import init_state, state_shardings
    from alignment.train.step import jit_train_step, make_train_step
    from benchmarks.common import bench_small_config, peak_rss_mb, timed

    config = load_config_file("configs/sft.py")
    config.model.dtype = config.model.param_dtype = dtype
    if model_name == "bench-small":
        model_cfg = bench_small_config(dtype=dtype, param_dtype=dtype)
    elif model_name == "1b":  # Llama-shaped, 1.1B parameters (TinyLlama's shape)
        model_cfg = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                num_heads=32, num_kv_heads=4, dtype=dtype, param_dtype=dtype, remat_policy="full")
    else:
        model_cfg = runtime.model_config(config)
    model_cfg = dataclasses.replace(model_cfg, attention_impl="xla_flash")
    model = Transformer(model_cfg)
    config.lora.enabled = mode != "full"
    config.lora.quantize = {"qlora_int8": "int8", "qlora_nf4": "nf4"}.get(mode, "none")
    config.lora.rank, config.lora.alpha = 16, 32.0
    config.mesh.data = 1
    mesh, rules = runtime.mesh_and_rules(config, jax.devices()[:1])
    optimizer, schedule = make_optimizer(config.optimizer, 100)
    if mode == "full":
        _, shardings = state_shardings(model, optimizer, mesh, rules, dummy_inputs())
        state = init_state(model, optimizer, shardings, 0, dummy_inputs())
    else:
        with tempfile.TemporaryDirectory() as workdir:
            checkpointer, state, _, shardings = adapters.resume_or_init(config, workdir, model, model_cfg, optimizer,
                                                                        mesh, rules, dummy_inputs())
            checkpointer.close()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}
    target = runtime.batch_sharding(mesh, rules)
    placed = runtime.place_batch(data, target)
    step = jit_train_step(make_train_step(functools.partial(sft_loss, model), optimizer, schedule), shardings, target)
    box = {"state": state}

    def one():
        box["state"], metrics = step(box["state"], placed)
        return metrics["loss"]

    with runtime.activation_context(mesh, rules):
        median, _ = timed(one, repeats=steps, warmup=2)
    trainable = sum(x.size for x in jax.tree.leaves(box["state"].params))
    return {"bench": "lora_sft", "model": model_name, "mode": mode, "dtype": dtype, "batch": batch, "seq": seq,
            "params": model_cfg.num_params(), "trainable_params": int(trainable), "step_s": median,
            "tokens_per_s": batch * seq / median, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=("tiny", "bench-small", "1b"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # run one mode in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.batch, args.seq, args.steps, args.dtype)), flush=True)
        return
    for mode in args.modes.split(","):
        command = [sys.executable, "-m", "benchmarks.bench_lora", f"--one={mode}", f"--model={args.model}",
                   f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}", f"--dtype={args.dtype}"]
        out = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if out.returncode == 0 and lines else json.dumps(
            {"bench": "lora_sft", "mode": mode, "returncode": out.returncode,
             "error": out.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
