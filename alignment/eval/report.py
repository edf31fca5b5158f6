"""Reports of an evaluation run: results.json (every per-sample result), summary.md, charts/*.png.

`results` is {checkpoint: {benchmark: {"metrics", "categories", "samples", ...}}}.
"""
from __future__ import annotations

import json
import os

import numpy as np


def summary_markdown(results: dict) -> str:
    """One table per benchmark: a row per checkpoint, a column per metric (and count); then the ids of the
    samples the loader skipped, if any."""
    benchmarks = list(dict.fromkeys(b for per_ckpt in results.values() for b in per_ckpt))
    lines = ["# Evaluation summary", ""]
    for bench in benchmarks:
        rows = {c: r[bench] for c, r in results.items() if bench in r}
        columns = list(dict.fromkeys(k for r in rows.values() for k in (*r["metrics"], *r.get("counts", {}))))
        lines += [f"## {bench}", "", "| checkpoint | samples | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 2) + "|"]
        for ckpt, r in rows.items():
            values = {**r["metrics"], **r.get("counts", {})}
            cells = [f"{values[c]:.4f}" if isinstance(values.get(c), float) else str(values.get(c, ""))
                     for c in columns]
            lines.append(f"| {ckpt} | {len(r['samples'])} | " + " | ".join(cells) + " |")
        skipped = list(dict.fromkeys(s["id"] for r in rows.values() for s in r.get("skipped", [])))
        if skipped:
            lines += ["", f"Skipped {len(skipped)} (not scorable; reasons in results.json): {', '.join(skipped)}"]
        lines.append("")
    return "\n".join(lines)


def _grouped_bars(path: str, title: str, groups: list[str], series: dict[str, list[float]]) -> None:
    """Bars grouped along x, one colour per series (checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training hosts
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_charts(results: dict, directory: str) -> list[str]:
    """Per benchmark: metrics across checkpoints, and the per-category breakdown of the headline score."""
    os.makedirs(directory, exist_ok=True)
    written = []
    benchmarks = list(dict.fromkeys(b for per_ckpt in results.values() for b in per_ckpt))
    for bench in benchmarks:
        rows = {c: r[bench] for c, r in results.items() if bench in r}
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r["metrics"]))
        path = os.path.join(directory, f"{bench}.png")
        _grouped_bars(path, bench, metrics, {c: [r["metrics"].get(m, 0.0) for m in metrics] for c, r in rows.items()})
        written.append(path)
        categories = list(dict.fromkeys(k for r in rows.values() for k in r["categories"]))
        if categories:
            path = os.path.join(directory, f"{bench}_categories.png")
            _grouped_bars(path, f"{bench} by category", categories,
                          {c: [r["categories"].get(k, 0.0) for k in categories] for c, r in rows.items()})
            written.append(path)
    return written


def write_report(results: dict, workdir: str) -> dict:
    """Write all three outputs; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(workdir, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    md_path = os.path.join(workdir, "summary.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(summary_markdown(results))
    return {"json": json_path, "markdown": md_path, "charts": write_charts(results, os.path.join(workdir, "charts"))}
