"""Ours and the peer (TRL / transformers) on the same work, one after the other in one invocation, per precision.

    python -m benchmarks.side_by_side [--items sft,grpo,rm,rm_packed,dpo,generate] [--precisions fp32,bf16] [--repeats 1]
                                      [--peers ../shared/peers] [--venv ~/.cache/alignment-peers/trl] [--out F.json]

Items (bench-small, random weights, the data of `../shared/peers/`): `sft` packed real tokens/s (bench_sft vs
bench_sft_trl.py, 8 steps each), `grpo` step time for 2 prompts x 8 samples x 128 tokens (bench_grpo vs
bench_grpo_trl.py), `rm` reward-model pairs/s (bench_preference rm vs bench_rm_trl.py; `rm_packed` the same with
ours packing two pairs per row), `dpo` pairs/s with the
reference online (bench_preference dpo_online vs bench_dpo_trl.py), `generate` tokens/s at batch 16 and 1, greedy and
top-p 0.9 (bench_generate vs bench_generate_hf.py), each set against the decode step's hardware bound
(bench_decode_bound: bytes read vs measured DRAM bandwidth, FLOPs vs measured matmul peak). Precision classes: `fp32` (ours float32; TRL bf16=False,
transformers on the fp32 model) and `bf16` (ours bf16 compute over fp32 parameters, generation with bf16 weights;
TRL bf16 autocast over fp32 parameters, transformers on the model cast to bf16), via `benchmarks/peer_shim.py`.

Each repeat runs both sides as fresh processes, alternating which goes first (ours, peer; then peer, ours), with
the load average read before each. A ratio is ours over the peer (the peer's over ours for a time), from the
medians of this invocation's runs only: nothing is compared against a figure measured elsewhere. Prints a table on
stderr and one JSON document (machine: CPU model and bf16/AVX flags, load, versions; every run; the ratios) on
stdout and to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

from alignment.models.config import cpu_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "peers"
VENV = pathlib.Path.home() / ".cache" / "alignment-peers" / "trl"
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")
DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
GENERATE = [f"b{b}_{m}_tokens_per_s" for b in (16, 1) for m in ("greedy", "top_p")]


def ours_command(item: str, precision: str) -> list[str]:
    dtype = ["--dtype", DTYPE[precision]]
    py = sys.executable
    return {
        "sft": [py, "-m", "benchmarks.bench_sft", "packed", "8", *dtype],
        "grpo": [py, "-m", "benchmarks.bench_grpo", "--steps", "5", *dtype],
        # 8 steps of 4 pairs time the first 32 pairs either way; --pairs 32 spares compiling the other 32's shapes.
        "rm": [py, "-m", "benchmarks.bench_preference", "--which", "rm", "--steps", "8", "--pairs", "32", *dtype],
        # The same pairs, steps and loss with the rm stage's `data.pairs_per_row=2` (two pairs back to back in a
        # row; one process only, so not configs/rm.py's default); TRL's reward trainer has no such layout.
        "rm_packed": [py, "-m", "benchmarks.bench_preference", "--which", "rm", "--steps", "8", "--pairs", "32",
                      "--pairs_per_row", "2", *dtype],
        "dpo": [py, "-m", "benchmarks.bench_preference", "--which", "dpo_online", "--steps", "8", "--pairs", "32",
                *dtype],
        "generate": [py, "-m", "benchmarks.bench_generate", "--batches", "16,1", "--repeats", "3", *dtype],
    }[item]


PEER_SCRIPT = {"sft": ["bench_sft_trl.py", "packed", "8"], "grpo": ["bench_grpo_trl.py"], "rm": ["bench_rm_trl.py"],
               "rm_packed": ["bench_rm_trl.py"], "dpo": ["bench_dpo_trl.py"], "generate": ["bench_generate_hf.py"]}
# item -> (metric, ours' result line, its key, the peer's key, higher is better)
METRICS = {
    "sft": [("real_tokens_per_s", "sft_packed", "real_tokens_per_s", "real_tokens_per_s", True)],
    "grpo": [("step_s", "grpo", "median_step_s", "median_step_s", False),
             ("completion_length", "grpo", "mean_completion_length", "mean_completion_len", None)],
    "rm": [("pairs_per_s", "preference_rm", "pairs_per_s", "pairs_per_s", True)],
    "rm_packed": [("pairs_per_s", "preference_rm", "pairs_per_s", "pairs_per_s", True)],
    "dpo": [("pairs_per_s", "preference_dpo_online", "pairs_per_s", "pairs_per_s", True)],
    "generate": [(key, "generate", key, key, True) for key in GENERATE],
}


def machine() -> dict:
    model = next((line.partition(":")[2].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    flags = cpu_flags()
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in FLAGS},
            "platform": platform.platform(), "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}


def result_lines(stdout: str) -> list[dict]:
    lines = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def run(command: list[str], timeout: float, jax_cache: str = "") -> dict:
    """One side's run: its JSON result lines, wall time, load average before it, and its error if it failed.
    `jax_cache`: JAX's persistent compilation cache for our side (compilation is never inside a timing)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if jax_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        error = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-800:]}"
        lines = result_lines(done.stdout)
    except subprocess.TimeoutExpired:
        error, lines = f"timed out after {timeout:.0f} s", []
    return {"command": " ".join(command), "load_avg_before": round(load, 2),
            "wall_s": round(time.perf_counter() - start, 1), "results": lines, "error": error}


def value(lines: list[dict], bench: str, key: str) -> float | None:
    """`key` of the line for `bench`; a generate line may prefix the engine's name (v2_b16_...)."""
    for line in lines:
        if line.get("bench") == bench or bench == "*":
            for name in (key, f"v2_{key}"):
                if isinstance(line.get(name), (int, float)):
                    return float(line[name])
    return None


def compare(item: str, precision: str, ours: list[dict], peer: list[dict]) -> list[dict]:
    """One row per metric: the medians of each side's runs and ours-vs-peer (>1: ours is better)."""
    rows = []
    for metric, bench, ours_key, peer_key, higher in METRICS[item]:
        a = [v for r in ours if (v := value(r["results"], bench, ours_key)) is not None]
        b = [v for r in peer if (v := value(r["results"], "*", peer_key)) is not None]
        row = {"item": item, "precision": precision, "metric": metric, "ours": a, "peer": b}
        if a and b:
            ours_m, peer_m = statistics.median(a), statistics.median(b)
            row.update(ours_median=ours_m, peer_median=peer_m)
            if higher is not None:
                row["ratio"] = round(ours_m / peer_m if higher else peer_m / ours_m, 2)
        rows.append(row)
    return rows


def add_bound(rows: list[dict], bound: dict) -> None:
    """Each generation row gains the decode bound of its dtype and batch (bench_decode_bound) and ours' fraction."""
    for row in rows:
        if row["item"] == "generate" and "ours_median" in row:
            batch = row["metric"].split("_")[0]  # b16 | b1
            limit = bound.get(f"{DTYPE[row['precision']]}_{batch}", {}).get("bound_tokens_per_s")
            if limit:
                row.update(bound_tokens_per_s=limit, ours_fraction_of_bound=round(row["ours_median"] / limit, 2))


def versions(runs: list[dict]) -> dict:
    import jax
    import jaxlib

    found = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    for r in runs:
        for line in r["results"]:
            for key in ("torch", "transformers", "trl", "threads"):
                if key in line:
                    found[f"peer_{key}"] = line[key]
    return found


def table(rows: list[dict]) -> str:
    out = ["item       precision  metric                     ours          peer          ratio"]
    for r in rows:
        fmt = lambda x: f"{x:.3f}" if isinstance(x, float) and x < 10 else (f"{x:.1f}" if x is not None else "-")
        out.append(f"{r['item']:<10} {r['precision']:<10} {r['metric']:<26} {fmt(r.get('ours_median')):>12}  "
                   f"{fmt(r.get('peer_median')):>12}  {r.get('ratio', '-')!s:>6}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default=",".join(METRICS), help=f"comma-separated, of {list(METRICS)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per item and precision")
    parser.add_argument("--peers", default=str(PEERS), help="the peer scripts' directory")
    parser.add_argument("--venv", default=str(VENV), help="the peers' venv (shared/peers/setup.sh makes it)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--jax_cache", default=str(pathlib.Path.home() / ".cache" / "alignment-side-by-side"),
                        help="persistent compilation cache of our runs ('' for none): repeats skip compiling")
    args = parser.parse_args()
    items, precisions = args.items.split(","), args.precisions.split(",")
    for name, chosen, valid in (("--items", items, METRICS), ("--precisions", precisions, DTYPE)):
        if bad := [x for x in chosen if x not in valid]:
            parser.error(f"{name}: unknown {bad}; choose from {list(valid)}")
    peer_python = pathlib.Path(args.venv) / "bin" / "python"
    if not peer_python.exists():
        parser.error(f"--venv {args.venv}: no bin/python (run {args.peers}/setup.sh)")
    if not (pathlib.Path(args.peers) / "common.py").exists():
        parser.error(f"--peers {args.peers}: not the peer scripts' directory (no common.py)")

    report = {"command": " ".join(sys.argv), "machine": machine(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_avg_start": os.getloadavg(), "runs": [], "ratios": []}
    shim = str(REPO / "benchmarks" / "peer_shim.py")
    for item in items:
        for precision in precisions:
            sides = {"ours": ours_command(item, precision),
                     "peer": [str(peer_python), shim, precision, args.peers, *PEER_SCRIPT[item]]}
            done = {"ours": [], "peer": []}
            for repeat in range(args.repeats):
                for side in (("ours", "peer") if repeat % 2 == 0 else ("peer", "ours")):
                    print(f"[{time.strftime('%H:%M:%S')}] {item} {precision} {side} (repeat {repeat + 1})",
                          file=sys.stderr, flush=True)
                    result = run(sides[side], args.timeout, args.jax_cache if side == "ours" else "")
                    if result["error"]:
                        print(f"  failed: {result['error']}", file=sys.stderr, flush=True)
                    done[side].append(result)
                    report["runs"].append({"item": item, "precision": precision, "side": side, **result})
            report["ratios"] += compare(item, precision, done["ours"], done["peer"])
            if args.out:  # what is done so far survives a run stopped early
                pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if "generate" in items:  # the decode step's hardware bound, to set the generation rows against
        print(f"[{time.strftime('%H:%M:%S')}] decode bound", file=sys.stderr, flush=True)
        bound = run([sys.executable, "-m", "benchmarks.bench_decode_bound"], args.timeout)
        report["decode_bound"] = bound
        add_bound(report["ratios"], bound["results"][0] if bound["results"] else {})
    report.update(finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  load_avg_end=os.getloadavg(), versions=versions(report["runs"]))
    print(table(report["ratios"]), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
