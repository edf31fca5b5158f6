"""DPO pairs/s and reward-model step time on bench-small with HH-RLHF harmless pairs; prints one JSON line per run.

    python benchmarks/bench_preference.py [--pairs 64] [--steps 12] [--which dpo_precomputed,dpo_online,rm]

Same work as the TRL peers (`shared/peers/bench_dpo_trl.py`, `bench_rm_trl.py`): bench-small with random
weights, the llama2 tokenizer, the first 64 harmless-base test pairs, max length 512 per sequence, 4 pairs per
optimizer step, beta 0.1. Each pair is one row (chosen = segment 1, rejected = segment 2; with --share_prefix,
the default, their shared prompt is held once), or --pairs_per_row pairs back to back; batches are trimmed to a
multiple of 64 columns and every shape is compiled before timing. --dtype picks the compute dtype (weights fp32).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import numpy as np
import ml_collections

from alignment.algorithms import dpo, rm
from alignment.data import preference
from alignment.data.tokenizer import load_tokenizer
from alignment.models import Transformer, from_hf_config
from alignment.models.transformer import dummy_inputs
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings
from alignment.train.step import make_train_step
from alignment import sharding

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def hh_rows(num_pairs: int, max_length: int, template: str, share_prefix: bool) -> tuple[list[dict], dict]:
    """The first `num_pairs` usable harmless-base test pairs as packed rows (bad records skipped and counted)."""
    tokenizer = load_tokenizer(os.path.join(SHARED, "tokenizers", "llama2", "tokenizer.model"))
    encoder = preference.Encoder(tokenizer, template, max_length, share_prefix=share_prefix)
    path = os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz")
    rows, stats = preference.encode_pairs(path, encoder, skip_bad_records=True)
    return rows[:num_pairs], stats.summary()


def run(which: str, rows: list[dict], steps: int, batch_pairs: int, trim_multiple: int,
        attention_impl: str = "xla_flash", pairs_per_row: int = 1, dtype: str = "float32",
        scan_layers: bool = False) -> dict:
    model_cfg = from_hf_config(os.path.join(SHARED, "peers", "bench-small", "config.json"), value_head=which == "rm",
                               attention_impl=attention_impl, dtype=dtype, scan_layers=scan_layers)
    model = Transformer(model_cfg)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    rules = dict(sharding.DEFAULT_RULES)
    # AdamW with global-norm clipping at 1.0, as TRL's defaults; the reward model's unused lm_head is frozen.
    opt_cfg = ml_collections.ConfigDict(dict(lr=1e-6 if which != "rm" else 1e-5, warmup_steps=0, schedule="constant",
                                             end_lr_factor=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                             clip_norm=1.0))
    optimizer, schedule = make_optimizer(opt_cfg, steps, rm.unused_params(model_cfg) if which == "rm" else ())
    abstract, shardings = state_shardings(model, optimizer, mesh, rules, dummy_inputs())
    state = init_state(model, optimizer, shardings, 0, dummy_inputs())
    layout = preference.leaf_shardings(dict(rows[0], ref_logps=None),
                                       sharding.named_sharding(mesh, rules, "batch", "seq"))
    batches = [preference.compact(b, pairs_per_row, trim_multiple) for b in preference.fixed_batches(rows, batch_pairs)]

    precompute_s = 0.0
    logps_fn = jax.jit(functools.partial(dpo.sequence_logps, model))
    if which.startswith("dpo"):
        reference = jax.tree.map(lambda x: x.copy(), state.params)
        if which == "dpo_precomputed":  # one pass of the reference over the data, then no reference model
            for b in batches:  # compile every shape first so the pass is timed warm
                logps_fn(reference, preference.place(b, layout))[0].block_until_ready()
            t0 = time.perf_counter()
            for b in batches:
                b["ref_logps"] = np.asarray(logps_fn(reference, preference.place(b, layout))[0])
            precompute_s = time.perf_counter() - t0
            reference = None
        loss_fn = functools.partial(dpo.dpo_loss, model, loss_type="sigmoid", beta=0.1)
    else:
        reference = None
        loss_fn = functools.partial(rm.reward_loss, model, alpha=0.0)

    step = jax.jit(make_train_step(loss_fn, optimizer, schedule), donate_argnums=(0,))

    def one_step(state, b):
        placed = preference.place(b, layout)
        if reference is not None:  # online: the reference forward is part of every step, as in TRL
            placed["ref_logps"] = logps_fn(reference, placed)[0]
        return step(state, placed)

    seen = set()
    for b in batches:  # compile each trimmed shape once, outside the timing
        shape = tuple(b[k].shape[1] for k in ("inputs", "kv_index") if k in b)  # (columns, key slots)
        if shape not in seen:
            seen.add(shape)
            state, m = one_step(state, b)
            jax.block_until_ready(m)
    times, tokens = [], []
    for i in range(steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        state, m = one_step(state, b)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
        tokens.append(int(b["segment_ids"].astype(bool).sum()))
    median = statistics.median(times)
    result = {
        "bench": f"preference_{which}", "dtype": dtype, "param_dtype": model_cfg.param_dtype, "steps_timed": steps,
        "pairs_per_step": batch_pairs,
        "median_step_s": round(median, 3), "pairs_per_s": round(batch_pairs / median, 3),
        "real_tokens_per_s": round(float(np.sum(tokens)) / float(np.sum(times)), 1),
        "shapes_compiled": sorted(seen),
    }
    if which == "dpo_precomputed":
        result["reference_pass_s_per_pair"] = round(precompute_s / len(rows), 4)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_pairs", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--trim_multiple", type=int, default=64)
    parser.add_argument("--template", default="llama2")
    parser.add_argument("--which", default="dpo_precomputed,dpo_online,rm")
    parser.add_argument("--attention_impl", default="xla_flash",
                        help="xla_flash (as configs/rm.py and dpo.py: skips padding tiles) or xla (dense scores)")
    parser.add_argument("--pairs_per_row", type=int, default=1, help="pairs packed back to back in one row")
    parser.add_argument("--share_prefix", type=int, default=1,
                        help="1 (as configs/rm.py and dpo.py): a pair's shared prompt is held once per row")
    parser.add_argument("--scan_layers", type=int, default=0, help="0: layers unrolled (model.scan_layers=False)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    args = parser.parse_args()
    rows, data = hh_rows(args.pairs, args.max_length, args.template, bool(args.share_prefix))
    tokens = [int(r["segment_ids"].astype(bool).sum()) for r in rows]
    print(json.dumps({"bench": "preference_data", "pairs": len(rows), "mean_tokens_per_pair": float(np.mean(tokens)),
                      "max_tokens_per_pair": max(tokens), "truncated_sequences": data["truncated"],
                      "share_prefix": bool(args.share_prefix), "shared_tokens": data["shared_tokens"],
                      "load_average": os.getloadavg()}))
    for which in args.which.split(","):
        print(json.dumps(run(which, rows, args.steps, args.batch_pairs, args.trim_multiple, args.attention_impl,
                             args.pairs_per_row, args.dtype, bool(args.scan_layers))), flush=True)
    print(json.dumps({"load_average_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
