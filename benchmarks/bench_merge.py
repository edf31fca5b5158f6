"""Merge benchmark: base + three variants of a 254M-param fp32 Llama (as /work/shared/peers/make_merge_models.py
builds them), merged with linear, TIES, DARE-TIES, Model Stock and SLERP of two; each merge in a fresh process
(wall time, GB/s of input read, peak RSS), next to a plain copy of the inputs and, optionally, mergekit.
`x_copy_floor` divides by `cp -r` of the three fine-tuned models (the peers' I/O floor); `x_own_inputs_floor` by a
copy of exactly what that method reads (with the base for TIES, DARE and Model Stock, two models for SLERP).

    python benchmarks/bench_merge.py --models=/tmp/merge-models [--mergekit=$HOME/.cache/alignment-peers/merge/bin]

Prints one JSON object per line. Inputs are read from the page cache (warmed first, as the mergekit script does).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# method -> (models, uses base, parameters): the work of the mergekit rows in /work/shared/data/peers/RESULTS.md
RUNS = {
    "linear": (["ft0", "ft1", "ft2"], False, {}),
    "ties": (["ft0", "ft1", "ft2"], True, {"density": 0.5}),
    "dare_ties": (["ft0", "ft1", "ft2"], True, {"density": 0.5}),
    "model_stock": (["ft0", "ft1", "ft2"], True, {}),
    "slerp": (["ft0", "ft1"], False, {"t": 0.5}),
}
MERGEKIT_YAML = {  # mergekit's own spelling of the same merges
    "linear": "merge_method: linear\nmodels:\n{models}dtype: float32\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n{models}parameters: {{normalize: true}}\ndtype: float32\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n{models}dtype: float32\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n{models}dtype: float32\n",
    "slerp": "merge_method: slerp\nbase_model: {first}\nmodels:\n{models}parameters: {{t: 0.5}}\ndtype: float32\n",
}


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, stdout) of one child process.

    Dirty pages of the previous run's output are flushed first, so their writeback does not land in this run.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1e6, out


def one_merge(args) -> None:
    """Child mode: run a single merge and print its summary."""
    sys.path.insert(0, REPO)
    from alignment.merge import merge_checkpoints

    spec = json.loads(args.one)
    print(json.dumps(merge_checkpoints(**spec)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="/tmp/merge-models")
    parser.add_argument("--out", default="/tmp/merge-bench-out")
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--paths", default="hf,orbax", help="hf: safetensors -> safetensors; orbax: Orbax -> Orbax")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", default="", help="directory holding mergekit-yaml; '' skips mergekit")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_merge(args)
    m = args.models
    inputs = [os.path.join(m, f"ft{i}") for i in range(3)]
    input_bytes = sum(os.path.getsize(os.path.join(d, f)) for d in inputs for f in os.listdir(d))
    subprocess.run(f"cat {m}/*/*.safetensors > /dev/null", shell=True, check=True)
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}))

    def copy_floor(dirs: list[str]) -> float:
        """Median seconds of `cp -r` of `dirs` (dirty pages flushed before each copy, as before each merge)."""
        walls = []
        for _ in range(args.repeats):
            dest = tempfile.mkdtemp(prefix="merge-copy-floor-", dir="/tmp")
            os.sync()
            start = time.perf_counter()
            subprocess.run(["cp", "-r", *dirs, dest], check=True)
            walls.append(time.perf_counter() - start)
            shutil.rmtree(dest)
        return statistics.median(walls)

    own_floors = {}  # (models, uses base) -> copy of exactly those inputs
    for names, uses_base, _ in RUNS.values():
        key = (tuple(names), uses_base)
        if key not in own_floors:
            own_floors[key] = copy_floor([os.path.join(m, n) for n in [*names, *["base"] * uses_base]])
            print(json.dumps({"bench": "merge_copy_floor_own_inputs", "inputs": list(names) + ["base"] * uses_base,
                              "wall_s": round(own_floors[key], 3)}))
    floor_s = own_floors[(tuple(os.path.basename(d) for d in inputs), False)]  # linear's inputs: the peers' floor
    print(json.dumps({"bench": "merge_copy_floor", "input_bytes": input_bytes, "wall_s": round(floor_s, 3)}))

    orbax = os.path.join(args.out, "orbax-inputs")
    if "orbax" in args.paths.split(","):  # converted once (an exact identity merge), not timed
        for name in ("base", "ft0", "ft1", "ft2"):
            if not os.path.isdir(os.path.join(orbax, name)):
                spec = dict(models=[os.path.join(m, name)], method="linear", output=os.path.join(orbax, name))
                timed([sys.executable, __file__, "--one", json.dumps(spec)])

    for method in args.methods.split(","):
        names, uses_base, params = RUNS[method]
        for path in args.paths.split(","):
            root = m if path == "hf" else orbax
            out = os.path.join(args.out, f"out-{method}")
            spec = dict(models=[os.path.join(root, n) for n in names], method=method, params=params,
                        base=os.path.join(root, "base") if uses_base else "", overwrite=True,
                        **({"hf_output": out} if path == "hf" else {"output": out}))
            runs = []
            for _ in range(args.repeats):
                # Every run writes a fresh output, as the copy and mergekit do (replacing one costs its deletion).
                shutil.rmtree(out, ignore_errors=True)
                runs.append(timed([sys.executable, __file__, "--one", json.dumps(spec)]))
            shutil.rmtree(out, ignore_errors=True)
            wall = statistics.median(r[0] for r in runs)
            read = json.loads(runs[0][2])["input_bytes"]
            # merge_s: inside the child, merge_checkpoints alone (no interpreter start, imports or exit)
            merge_s = statistics.median(json.loads(r[2])["wall_s"] for r in runs)
            print(json.dumps({"bench": f"merge_{method}_{path}", "wall_s": round(wall, 2), "merge_s": round(merge_s, 2),
                              "walls": [round(r[0], 2) for r in runs], "read_gb_per_s": round(read / wall / 1e9, 2),
                              "peak_rss_gb": round(max(r[1] for r in runs), 2), "x_copy_floor": round(wall / floor_s, 2),
                              "x_own_inputs_floor": round(wall / own_floors[(tuple(names), uses_base)], 2)}),
                  flush=True)
        if args.mergekit:
            body = "".join(f"  - model: {m}/{n}\n" + ("    parameters: {weight: 1.0, density: 0.5}\n"
                                                       if method in ("ties", "dare_ties") else
                                                       "    parameters: {weight: 1.0}\n" if method == "linear" else "")
                           for n in names)
            yaml = MERGEKIT_YAML[method].format(models=body, base=f"{m}/base", first=f"{m}/ft0")
            config = os.path.join(args.out, f"mergekit-{method}.yml")
            with open(config, "w") as f:
                f.write(yaml)
            out = os.path.join(args.out, f"mergekit-out-{method}")
            wall, rss, _ = timed([os.path.join(args.mergekit, "mergekit-yaml"), config, out])
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps({"bench": f"merge_{method}_mergekit", "wall_s": round(wall, 2), "peak_rss_gb": round(rss, 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
