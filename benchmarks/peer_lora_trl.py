"""The peer of bench_lora: TRL's SFTTrainer with a PEFT LoRA adapter on bench-small (CPU torch), the same rows
(seeded random token ids, every token in the loss), batch, length and rank as `bench_lora`'s LoRA mode.
Runs in the peer venv (../shared/peers/setup.sh, plus `pip install peft`); prints one JSON line.

`--dtype` picks the precision class, matched to `bench_lora --dtype`: float32 turns off the bf16 autocast that
SFTConfig enables by default; bfloat16 loads the frozen base in bfloat16 and keeps that autocast (PEFT keeps the
adapters in float32), the usual LoRA recipe.

    ~/.cache/alignment-peers/trl/bin/python benchmarks/peer_lora_trl.py --batch=8 --seq=256 --steps=5 --dtype=float32
"""
import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
CONFIG = os.path.join(DATA, "peers", "bench-small", "config.json")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = LlamaConfig(**json.load(open(CONFIG)))
    bf16 = args.dtype == "bfloat16"
    model = LlamaForCausalLM(config).to(torch.bfloat16 if bf16 else torch.float32)
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(3, config.vocab_size, args.seq + 1).tolist()}
            for _ in range(args.batch * (args.steps + 2))]
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg = SFTConfig(output_dir="/tmp/peer-lora-trl", max_length=args.seq + 1, packing=False,
                    per_device_train_batch_size=args.batch, learning_rate=1e-4, max_steps=args.steps + 2,
                    logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, bf16=bf16)
    tokenizer = transformers.LlamaTokenizer.from_pretrained(os.path.join(DATA, "tokenizers", "llama2"))
    tokenizer.pad_token = tokenizer.unk_token
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), peft_config=lora,
                         processing_class=tokenizer, callbacks=[timer])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    median = statistics.median(timer.times[2:])
    print(json.dumps({"bench": "lora_sft_peer", "peer": "trl+peft", "batch": args.batch, "seq": args.seq,
                      "rank": args.rank, "dtype": args.dtype, "bf16_autocast": cfg.bf16, "trainable_params": trainable, "step_s": median,
                      "tokens_per_s": args.batch * args.seq / median,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
