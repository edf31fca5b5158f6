"""Synchronous vs pipelined GRPO on the embedded main job, and the rollout/training split's overlap.

    python -m benchmarks.bench_grpo_async curves [--seeds 0 1 2] [--out DIR] [--set KEY=VALUE ...]
    python -m benchmarks.bench_grpo_async split [--rollout_devices 4] [--steps 20] [--out DIR] [--set KEY=VALUE ...]

curves: `configs/grpo.py` (synchronous) and `configs/grpo_async.py` (max_staleness 1, TIS) for each seed, one
after the other, each as the main job runs (`python -m alignment.launch`, SFT warm start included); writes
grpo_async_curves.png (train reward and held-out accuracy, both configs, every seed) and grpo_async_curves.json
(the numbers) to --out (default benchmarks/results).

split: configs/grpo_async.py on 8 simulated CPU devices, the first --rollout_devices sampling and the rest
training, against the same run on the shared mesh; prints the per-step phase medians (generation, scoring,
update, the trainer's wait for a rollout) and the overlap (fraction of wall time both sides were busy). On a CPU
the simulated devices share the same cores, so this shows the schedule, not a speed-up.

--set KEY=VALUE adds `--config.KEY=VALUE` to every run (e.g. `--set model.dtype=float32
--set warm_start.model.dtype=float32` to pin the precision).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONFIGS = {"synchronous": "configs/grpo.py", "pipelined (k=1, TIS)": "configs/grpo_async.py"}


def launch(config: str, workdir: str, *overrides: str, devices: int | None = None) -> float:
    """Run the main job's command line; its wall seconds."""
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alignment.launch", f"--config={config}", f"--workdir={workdir}",
                    *overrides], check=True, env=env, cwd=pathlib.Path(__file__).resolve().parents[1])
    return time.perf_counter() - start


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def curves(seeds: list[int], out: pathlib.Path, overrides: list[str]) -> dict:
    runs = {}
    for name, config in CONFIGS.items():
        for seed in seeds:
            workdir = pathlib.Path(tempfile.mkdtemp(prefix="grpo-async-"))
            wall = launch(config, str(workdir), f"--config.seed={seed}", *overrides)
            history = read_jsonl(workdir / "curve.jsonl")
            summary = json.loads((workdir / "summary.json").read_text())
            runs.setdefault(name, []).append({"seed": seed, "wall_s": wall, "history": history, "summary": summary})
            print(json.dumps({"config": name, "seed": seed, "wall_s": round(wall, 1),
                              "accuracy_before": summary["accuracy_before"],
                              "accuracy_after": summary["accuracy_after"]}), flush=True)
    plot(runs, out / "grpo_async_curves.png")
    final = {name: [r["summary"]["accuracy_after"] for r in rs] for name, rs in runs.items()}
    result = {"bench": "grpo_async_curves", "seeds": seeds, "overrides": overrides,
              "cpu": platform.processor() or platform.machine(),
              "final_accuracy": final,
              "final_accuracy_mean": {name: statistics.mean(v) for name, v in final.items()},
              "final_accuracy_stdev": {name: statistics.stdev(v) if len(v) > 1 else 0.0 for name, v in final.items()},
              "runs": runs}
    (out / "grpo_async_curves.json").write_text(json.dumps(result, indent=1))
    return result


def plot(runs: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (name, rs) in zip(("C0", "C1"), runs.items()):
        for i, run in enumerate(rs):
            trained = [h for h in run["history"] if "train_reward" in h]
            evals = [h for h in run["history"] if "accuracy" in h]
            label = f"{name}" if i == 0 else None
            reward_axis.plot([h["step"] for h in trained], [h["train_reward"] for h in trained], color=color,
                             alpha=0.45, lw=1, label=label)
            accuracy_axis.plot([h["step"] for h in evals], [h["accuracy"] for h in evals], "o-", color=color,
                               alpha=0.6, label=label)
    reward_axis.set(title="train reward (each seed)", xlabel="RL step")
    accuracy_axis.set(title="held-out greedy accuracy (each seed)", xlabel="RL step")
    for axis in (reward_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def split(rollout_devices: int, steps: int, out: pathlib.Path, overrides: list[str]) -> dict:
    result = {"bench": "grpo_async_split", "devices": 8, "rollout_devices": rollout_devices, "steps": steps,
              "overrides": overrides,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    for name, devices in (("shared mesh", 0), ("split mesh", rollout_devices)):
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="grpo-split-"))
        wall = launch("configs/grpo_async.py", str(workdir), f"--config.steps={steps}", "--config.rl.eval_every=0",
                      f"--config.rl.rollout_devices={devices}", "--config.checkpoint.every=0", *overrides, devices=8)
        records = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("split") == "train"][1:]
        summary = json.loads((workdir / "summary.json").read_text())
        phases = ("generation_s", "scoring_s", "update_s", "rollout_wait_s")
        result[name] = {"wall_s": wall, "pipeline": summary["pipeline"],
                        "median_s": {p: statistics.median(r[p] for r in records) for p in phases},
                        "staleness": summary["staleness"]}
        print(json.dumps({name: result[name]}), flush=True)
    (out / "grpo_async_split.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("curves", "split"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rollout_devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"--config.{item}" for item in args.set]
    result = (curves(args.seeds, out, overrides) if args.what == "curves"
              else split(args.rollout_devices, args.steps, out, overrides))
    result.pop("runs", None)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
