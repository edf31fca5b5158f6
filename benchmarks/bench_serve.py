"""Serving under concurrency: many clients at once against one alone, the continuous-batching server against the
serialized one it replaced.

    PYTHONPATH=. python benchmarks/bench_serve.py [--clients 16] [--tokens 128] [--repeats 2]

bench-small with random weights in float32, the llama2 tokenizer and chat template. Each client sends one chat
request over HTTP on localhost (its own GSM8K question, temperature 1 with its own seed) for exactly `tokens` new
tokens: the engines get no stop tokens, so random weights cannot end a request early. Servers, each in this process
behind `alignment.generation.http_server`:
  * v2: `alignment.serve.Service` (requests share the engine's batch; the engine's default slots);
  * serialized: the server before it (`benchmarks.static_engine.load_server()`: one request at a time, a lock
    around the static engine's generate).
For each server: one client alone (tokens/s = tokens / its latency), then all clients at once (total tokens/s =
clients x tokens / wall time of the burst; p50 / p95 of their latencies), the servers in turn, after a warm-up
round of each. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import time
import urllib.request

import flax.linen as nn
import jax
import numpy as np

from alignment import sharding
from alignment.generation.engine import Engine
from alignment.generation.http_server import serving
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.serve import Service
from benchmarks import common, static_engine
from benchmarks.bench_rollout import cpu_name




def request(url: str, question: str, tokens: int, seed: int) -> float:
    """Seconds until the whole answer arrived."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": tokens,
                       "temperature": 1.0, "seed": seed}).encode()
    start = time.perf_counter()
    post = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=3600) as answer:
        usage = json.loads(answer.read())["usage"]
    assert usage["completion_tokens"] == tokens, usage
    return time.perf_counter() - start


def burst(url: str, questions: list[str], tokens: int) -> tuple[float, list[float]]:
    """(wall seconds, each client's latency) of all questions sent at once."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        latencies = list(pool.map(lambda q: request(url, q[1], tokens, q[0]), enumerate(questions)))
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per server, in turn")
    args = parser.parse_args()

    config = common.bench_small_config()
    model = Transformer(config)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *dummy_inputs())["params"]))(jax.random.key(0))
    mesh = sharding.make_mesh({"data": -1})
    tokenizer = common.llama2_tokenizer()
    questions = [row["question"] for row in common.gsm8k("test", args.clients)]
    old = static_engine.load_server()
    services = {
        "v2": Service(Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=tokenizer.pad_id,
                             detokenize=lambda ids: tokenizer.decode(ids, skip_special=True)),
                      tokenizer, "llama2", "bench"),
        "serialized": old.Service(old.Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=tokenizer.pad_id),
                                  tokenizer, "llama2", "bench"),
    }
    result = {"bench": "serve", "model": "bench-small", "dtype": "float32", "clients": args.clients,
              "tokens": args.tokens, **cpu_name(), "load_avg_start": os.getloadavg()[0]}
    timings = {name: {"alone": [], "burst": [], "latencies": []} for name in services}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(serving(service, max_connections=256)) + "/v1/chat/completions"
                for name, service in services.items()}
        for name, url in urls.items():  # warm-up: every program shape the rounds use
            request(url, questions[0], args.tokens, 0)
            burst(url, questions, args.tokens)
        for _ in range(args.repeats):
            for name, url in urls.items():
                timings[name]["alone"].append(request(url, questions[0], args.tokens, 1))
                wall, latencies = burst(url, questions, args.tokens)
                timings[name]["burst"].append(wall)
                timings[name]["latencies"] += latencies
    for name, t in timings.items():
        result[f"{name}_one_client_tokens_per_s"] = round(args.tokens / statistics.median(t["alone"]), 1)
        result[f"{name}_{args.clients}_clients_tokens_per_s"] = round(
            args.clients * args.tokens / statistics.median(t["burst"]), 1)
        result[f"{name}_latency_p50_s"] = round(float(np.percentile(t["latencies"], 50)), 2)
        result[f"{name}_latency_p95_s"] = round(float(np.percentile(t["latencies"], 95)), 2)
        result[f"{name}_concurrency_gain"] = round(
            result[f"{name}_{args.clients}_clients_tokens_per_s"] / result[f"{name}_one_client_tokens_per_s"], 2)
    result["v2_vs_serialized"] = round(result[f"v2_{args.clients}_clients_tokens_per_s"]
                                       / result[f"serialized_{args.clients}_clients_tokens_per_s"], 2)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
