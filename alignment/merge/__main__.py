"""Run a mergekit YAML merge configuration: python -m alignment.merge CONFIG.yml OUTPUT_DIR [options].

The same YAML as `mergekit-yaml CONFIG.yml OUTPUT_DIR` gives the same tensors (see
`alignment.merge.mergekit_yaml` for the fields and what each maps to); the output is an HF safetensors
directory. Prints the merge summary as JSON; bad input is a one-line error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from alignment.merge.mergekit_yaml import load_mergekit_yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignment.merge", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="mergekit YAML merge configuration")
    parser.add_argument("output", help="HF safetensors directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output once the new one is done")
    parser.add_argument("--seed", type=int, default=0, help="DARE's draws (with each tensor's name and layer)")
    parser.add_argument("--workers", type=int, default=0, help="merge threads; 0 = one per CPU")
    parser.add_argument("--memory_budget_gb", type=float, default=1.0, help="bytes of tensors in flight, in GiB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        merge = load_mergekit_yaml(args.config)
        summary = merge.run(hf_output=args.output, seed=args.seed, overwrite=args.overwrite, workers=args.workers,
                            memory_budget_bytes=int(args.memory_budget_gb * 2**30))
    except (ValueError, FileNotFoundError) as e:  # they name their file, field or tensor
        sys.exit(f"error: {e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
