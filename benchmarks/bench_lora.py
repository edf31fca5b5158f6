"""Full fine-tuning vs LoRA vs QLoRA (int8, nf4) SFT steps: median step time, tokens/s and peak RSS, one process
per mode (so each peak RSS is that mode's own). Prints one JSON line per mode.

    python -m benchmarks.bench_lora --model=tiny            # the embedded tiny model (no shared data needed)
    python -m benchmarks.bench_lora --model=bench-small     # ../shared/data/peers/bench-small/config.json
    python -m benchmarks.bench_lora --model=1b --dtype=bfloat16 --batch=1 --seq=128 --steps=2
    ~/.cache/alignment-peers/trl/bin/python benchmarks/peer_lora_trl.py   # the TRL + PEFT peer, same rows and rank
    python -m benchmarks.bench_lora --model=bench-small --rollout --steps=3   # sampling: unmerged vs merged adapters
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
    from alignment.models import Transformer
    from alignment.models.transformer import dummy_inputs
    from alignment.train import adapters, runtime
    from alignment.train.optimizer import make_optimizer
    from alignment.train.state import init_state, state_shardings
    from alignment.train.step import jit_train_step, make_train_step
    from benchmarks.common import bench_small_config, one_b_config, peak_rss_mb, timed

    config = load_config_file("configs/sft.py")
    config.model.dtype = config.model.param_dtype = dtype
    if model_name == "bench-small":
        model_cfg = bench_small_config(dtype=dtype, param_dtype=dtype)
    elif model_name == "1b":
        model_cfg = one_b_config(dtype=dtype, param_dtype=dtype)
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


def measure_rollouts(model_name: str, prompts: int, samples: int, new_tokens: int, repeats: int) -> dict:
    """A GRPO step's sampling with adapters, two ways: the engine given base + adapters unmerged (what the
    stages do; on CPU the engine folds them into its copy of the weights), or the adapters merged into a full set
    of weights first (written into the previous merge's donated buffers), then sampled plainly. Fresh adapters
    each step, as after an update."""
    import jax
    import numpy as np
    import flax.linen as nn

    from alignment.config import load_config_file
    from alignment.generation.engine import Engine
    from alignment.generation.sampling import SamplingParams
    from alignment.models import Transformer, lora
    from alignment.models.transformer import dummy_inputs
    from alignment.train import runtime
    from benchmarks.common import bench_small_config, timed

    config = load_config_file("configs/sft.py")
    config.mesh.data = 1
    model_cfg = bench_small_config() if model_name == "bench-small" else runtime.model_config(config)
    model = Transformer(model_cfg)
    mesh, rules = runtime.mesh_and_rules(config, jax.devices()[:1])
    spec = lora.LoraSpec(rank=16, alpha=32.0)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.key(0))
    base = jax.jit(lambda k: nn.meta.unbox(model.init(k, *dummy_inputs())["params"]))(jax.random.key(0))
    abstract = nn.meta.unbox(lora.adapter_shapes(boxed, spec))
    engine = Engine(model_cfg, None, mesh, rules, pad_id=0)
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, model_cfg.vocab_size, 32).tolist() for _ in range(prompts)]
    keys = iter(range(10 ** 6))

    def adapters():
        fresh = lora.init_adapters(jax.random.key(next(keys)), {"lora": abstract["lora"]}, spec)
        return jax.tree_util.tree_map_with_path(lambda p, x: x + 0.01 if p[-1].key == "b" else x, fresh)

    def sample(params):
        return engine.generate(ids, new_tokens, SamplingParams(temperature=1.0), num_samples=samples, seeds=0,
                               params=params).tokens

    merge = jax.jit(lambda old, base, trainable: lora.merge(base, trainable, spec), donate_argnums=(0,))
    box = {"merged": jax.tree.map(lambda x: x.copy(), base)}

    def merged_step():
        box["merged"] = merge(box["merged"], base, adapters())
        return sample(box["merged"])

    unmerged_s, _ = timed(lambda: sample(lora.bind(base, adapters(), spec)), repeats=repeats, warmup=1)
    merged_s, _ = timed(merged_step, repeats=repeats, warmup=1)
    merge_s, _ = timed(lambda: merge(box["merged"], base, adapters()), repeats=repeats, warmup=1)
    return {"bench": "lora_rollout", "model": model_name, "prompts": prompts, "samples": samples,
            "new_tokens": new_tokens, "unmerged_s": unmerged_s, "merged_s": merged_s, "merge_alone_s": merge_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=("tiny", "bench-small", "1b"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # run one mode in this process
    parser.add_argument("--rollout", action="store_true", help="sampling with adapters: unmerged vs merged")
    args = parser.parse_args()
    if args.rollout:
        print(json.dumps(measure_rollouts(args.model, 16, 4, 64, args.steps)), flush=True)
        return
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
