"""Does SFT on synthesised constraint data raise instruction following? The embedded demonstration of the synth
recipes: the tiny model is fine-tuned from random init on (a) the seed instructions unexpanded, (b) the same seeds
expanded with constraints by recipe 2 (constraint expansion), (c) recipe 2 and 3 (response reversal) output mixed,
each with the same number of records and steps, then evaluated by the eval stage's ifeval benchmark (the project's
IFEval checkers) on held-out constraint prompts: instructions about topics none of the training seeds has, expanded
with IFEval-checkable constraints by the same recipe.

    python -m benchmarks.synth_demo [--workdir DIR] [--steps 300] [--records 800]

Everything comes from the embedded teacher (a rule-based stand-in), so the responses are templates: the question is
only whether the model learns to map stated constraints to the behaviour they ask for. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib

import ml_collections

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.pas.data import embedded_prompts
from alignment.pas.teacher import topic
from alignment.synth import constraints, embedded_text


def seed_files(workdir: str, held_out_share: float, seed: int) -> tuple[str, str]:
    """The PAS pool's writing / knowledge / advice prompts split by topic: held-out topics never occur in training."""
    pool = {r["prompt"]: r for r in embedded_prompts(20000, seed, duplicate_rate=0.0)
            if r["category"] in ("writing", "knowledge", "advice")}
    paths = {name: os.path.join(workdir, f"seeds_{name}.jsonl") for name in ("train", "held_out")}
    with open(paths["train"], "w") as train, open(paths["held_out"], "w") as held_out:
        for i, record in enumerate(pool.values()):
            subject = topic(record["prompt"], record["category"])
            out = held_out if zlib.crc32(subject.encode()) % 1000 < held_out_share * 1000 else train
            out.write(json.dumps({"id": f"seed-{i}", "prompt": record["prompt"],
                                  "category": record["category"]}) + "\n")
    return paths["train"], paths["held_out"]


def passage_file(workdir: str, train_seeds: str, num: int, seed: int) -> str:
    """Template passages about the training topics only (the reversal recipe's embedded pool draws any topic)."""
    with open(train_seeds) as f:
        topics = sorted({topic(r["prompt"], r["category"]) for r in map(json.loads, f)})
    path = os.path.join(workdir, "passages.jsonl")
    with open(path, "w") as f:
        for record in embedded_text.passages(constraints.load_taxonomy(), topics, num, seed):
            f.write(json.dumps(record) + "\n")
    return path


def synth(recipe: str, workdir: str, **options) -> dict:
    config = load_config_file(config_path(f"synth/{recipe}"))
    config[recipe].update(options)
    return stages.run("synth", config, workdir)


def take(path: str, num: int, out: str) -> int:
    with open(path) as f:
        records = [json.loads(line) for line in f][:num]
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return len(records)


def sft(train: str, eval_path: str, workdir: str, steps: int, seed: int) -> dict:
    config = load_config_file(config_path("sft"))
    source = lambda path: ml_collections.ConfigDict(  # noqa: E731
        dict(path=path, weight=1.0, format="auto", tfds_data_dir=""))
    config.seed, config.steps, config.eval_every = seed, steps, steps
    config.data.train = ml_collections.ConfigDict({"instruction_following": source(train)})
    config.data.eval = ml_collections.ConfigDict({"held_out": source(eval_path)})
    config.data.max_length = 320
    summary = stages.run("sft", config, workdir)
    return {"final_eval": summary.get("final_eval"), "data": summary["data"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--records", type=int, default=800)
    parser.add_argument("--held_out_prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="synth-demo-")
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    train_seeds, held_out_seeds = seed_files(workdir, 0.2, args.seed)
    common = dict(seeds=train_seeds, num_items=args.records + 200, checks="ifeval,rule")
    runs = {
        "seeds": synth("constraints", os.path.join(workdir, "synth_seeds"), **common, min_constraints=0,
                       max_constraints=0),
        "expanded": synth("constraints", os.path.join(workdir, "synth_expanded"), **common),
        "reversal": synth("reversal", os.path.join(workdir, "synth_reversal"), num_items=args.records + 200,
                          passages=passage_file(workdir, train_seeds, args.records + 200, args.seed)),
        "held_out": synth("constraints", os.path.join(workdir, "synth_held_out"), seeds=held_out_seeds,
                          num_items=args.held_out_prompts, checks="ifeval"),
    }
    with open(os.path.join(workdir, "synth_held_out", "sft.jsonl")) as f:
        held_out = [json.loads(line) for line in f]
    ifeval_path = os.path.join(workdir, "held_out_ifeval.jsonl")
    with open(ifeval_path, "w") as f:
        for i, record in enumerate(held_out):
            f.write(json.dumps({"key": i, "prompt": record["messages"][0]["content"],
                                "instruction_id_list": record["instruction_id_list"],
                                "kwargs": record["kwargs"]}) + "\n")
    data = {name: os.path.join(workdir, f"train_{name}.jsonl") for name in ("seeds", "expanded", "mixed")}
    counts = {"seeds": take(os.path.join(workdir, "synth_seeds", "sft.jsonl"), args.records, data["seeds"]),
              "expanded": take(os.path.join(workdir, "synth_expanded", "sft.jsonl"), args.records, data["expanded"])}
    with open(data["expanded"]) as f:
        expanded = f.readlines()[:args.records // 2]
    with open(os.path.join(workdir, "synth_reversal", "sft.jsonl")) as f:
        reversed_ = f.readlines()[:args.records - len(expanded)]
    with open(data["mixed"], "w") as f:
        f.writelines(expanded + reversed_)
    counts["mixed"] = len(expanded) + len(reversed_)
    eval_records = os.path.join(workdir, "synth_held_out", "sft.jsonl")
    trained = {name: sft(path, eval_records, os.path.join(workdir, f"sft_{name}"), args.steps, args.seed)
               for name, path in data.items()}
    config = load_config_file(config_path("eval"))
    config.checkpoints = ",".join(f"{name}={os.path.join(workdir, f'sft_{name}')}" for name in data)
    config.benchmarks, config.data.ifeval = "ifeval", ifeval_path
    config.generation.max_tokens = 256
    stages.run("eval", config, os.path.join(workdir, "eval"))
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        results = json.load(f)
    print(json.dumps({
        "workdir": workdir, "seconds": round(time.time() - start),
        "training_records": counts, "held_out_prompts": len(held_out), "steps": args.steps,
        "synth": {name: {k: s[k] for k in ("items", "records", "dropped")} for name, s in runs.items()},
        "held_out_loss": {name: t["final_eval"] for name, t in trained.items()},
        "ifeval": {name: {"metrics": r["ifeval"]["metrics"], "by_type_strict": r["ifeval"]["by_type_strict"]}
                   for name, r in results.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
