"""transformers `generate` on the rollout workload of bench_rollout.py, run in the peer venv (torch, transformers).

    ~/.cache/alignment-peers/trl/bin/python benchmarks/bench_rollout_hf.py WORKLOAD.json

WORKLOAD.json: {"prompts": [[token ids]...], "budgets": [per prompt], "samples": G, "seed": S}. bench-small with
random weights in float32 (the peers' own `common.model()`), 16 prompts x G samples per call (left-padded, a KV
cache), each call generating its longest budget (min_new_tokens = max_new_tokens, no EOS), sampled at
temperature 1. Prints {"seconds": wall time of all calls, "tokens": the budgets' tokens}.
"""
import json
import os
import sys
import time

PEERS = os.environ.get("ALIGNMENT_PEERS", "/work/shared/peers")
sys.path.insert(0, PEERS)

import common  # noqa: E402  (the peers' bench-small model)
import torch  # noqa: E402

PROMPTS_PER_CALL = 16


def main():
    work = json.load(open(sys.argv[1]))
    prompts, budgets, samples = work["prompts"], work["budgets"], work["samples"]
    model = common.model().eval()
    torch.manual_seed(work["seed"])
    start = time.perf_counter()
    for first in range(0, len(prompts), PROMPTS_PER_CALL):
        chunk, limit = prompts[first:first + PROMPTS_PER_CALL], max(budgets[first:first + PROMPTS_PER_CALL])
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=limit, min_new_tokens=limit, do_sample=True,
                           temperature=1.0, num_return_sequences=samples, pad_token_id=0, eos_token_id=None)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": samples * sum(budgets)}))


if __name__ == "__main__":
    main()
