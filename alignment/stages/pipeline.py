"""The Baichuan order as one job: PAS -> SFT base -> category-specialised SFT runs -> merge -> reward model -> GRPO
-> evaluation of every intermediate checkpoint side by side.

Each step is a whole stage config (config.pas, config.base, config.specialists.<name>, config.merge, config.rm,
config.grpo, config.eval) run by `stages.run` into workdir/<step>; the pipeline wires each step's outputs into the
next (init_from, merge.models / merge.base, the GRPO reward model's checkpoint, the checkpoints evaluated). A step
whose workdir/<step>/summary.json exists is reused, so a restart resumes at the interrupted step, which resumes
from its own checkpoints. With config.augment='pas', each specialist trains on its prompts as given and, beside
them, the same prompts with the PAS model's complement appended (workdir/<specialist>/augmented/). The report,
pipeline_report.md and pipeline_report.png, has one row per step.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

import ml_collections
import numpy as np

from alignment import stages
from alignment.config import Field, one_of
from alignment.data.sources import load_records
from alignment.pas.data import write_jsonl

logger = logging.getLogger(__name__)

FIELDS = {
    "augment": one_of("pas", "none"),
    "reward_model_weight": Field(low=0),
}
FIXED_STEPS = {"pas": "pas", "base": "sft", "merge": "merge", "rm": "rm", "grpo": "grpo", "eval": "eval"}
TIME_FILE = "pipeline_step.json"  # in each step's directory: the wall time of the run that finished it


def check(config: ml_collections.ConfigDict) -> None:
    """Every step's config is a whole config of its stage, checked as that stage checks it."""
    if not config.specialists:
        raise ValueError("config.specialists is empty: name at least one SFT run to merge (name -> sft config)")
    for name, step_config in step_configs(config).items():
        expected = FIXED_STEPS.get(name, "sft")
        if name in config.specialists and name in FIXED_STEPS:
            raise ValueError(f"config.specialists.{name}: the name of a pipeline step; choose another")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"config.specialists.{name}: use letters, digits, '_' and '-' (it names a directory)")
        if step_config.get("stage") != expected:
            raise ValueError(f"config.{_key(config, name)}.stage={step_config.get('stage')!r}: this step runs the "
                             f"{expected!r} stage")
        stages.check(step_config)


def _key(config: ml_collections.ConfigDict, name: str) -> str:
    return f"specialists.{name}" if name in config.specialists else name


def step_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{step: its config as given}, in the order they run (pas only with augment='pas')."""
    steps = {"pas": config.pas} if config.augment == "pas" else {}
    steps["base"] = config.base
    steps.update(config.specialists.items())
    steps.update(merge=config.merge, rm=config.rm, grpo=config.grpo, eval=config.eval)
    return steps


def run_step(name: str, step_config: ml_collections.ConfigDict, workdir: str, prepare=None) -> dict:
    """Run one step into workdir/<name> (after `prepare(step_config, directory)`, if given), or reuse it when its
    summary.json exists. Returns {stage, workdir, reused, seconds, summary}."""
    directory = os.path.join(workdir, name)
    summary_path, time_path = os.path.join(directory, "summary.json"), os.path.join(directory, TIME_FILE)
    if os.path.isfile(summary_path):
        logger.info("pipeline: %s: reusing the finished %s run in %s", name, step_config.stage, directory)
        with open(summary_path) as f:
            summary = json.load(f)
        seconds = None
        if os.path.isfile(time_path):
            with open(time_path) as f:
                seconds = json.load(f)["seconds"]
        return dict(stage=step_config.stage, workdir=directory, reused=True, seconds=seconds, summary=summary)
    logger.info("pipeline: %s: %s stage into %s", name, step_config.stage, directory)
    start = time.perf_counter()
    if prepare is not None:
        os.makedirs(directory, exist_ok=True)
        prepare(step_config, directory)
    summary = stages.run(step_config.stage, step_config, directory)
    seconds = round(time.perf_counter() - start, 1)
    with open(time_path, "w") as f:
        json.dump({"seconds": seconds}, f)
    logger.info("pipeline: %s finished in %.1f s", name, seconds)
    return dict(stage=step_config.stage, workdir=directory, reused=False, seconds=seconds, summary=summary)


def copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


class LazyPas:
    """The PAS model of workdir/pas, loaded on first use (not at all when every augmented file exists)."""

    def __init__(self, path: str, max_new_tokens: int):
        self.path, self.max_new_tokens, self._pas = path, max_new_tokens, None

    def augment_chats(self, chats: list[list[dict]]) -> list[list[dict]]:
        if self._pas is None:
            from alignment.pas.augment import load_pas

            self._pas = load_pas(self.path, self.max_new_tokens)
        return self._pas.augment_chats(chats)


def augmented_records(records: list[dict], pas) -> list[dict]:
    """`records` with the PAS complement appended to each prompt's last user turn; each distinct prompt (everything
    before the last assistant turn) is augmented once. Other fields are kept."""
    prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in records]
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    distinct = dict(zip(keys, prompts))
    augmented = dict(zip(distinct, pas.augment_chats(list(distinct.values()))))
    out = []
    for record, prompt, key in zip(records, prompts, keys):
        answer = record["messages"][len(prompt):]
        out.append({**{k: v for k, v in record.items() if k != "encoded"}, "messages": augmented[key] + answer})
    return out


def add_augmented_sources(sft: ml_collections.ConfigDict, directory: str, pas) -> None:
    """Beside each training source of `sft`, a source `<category>_pas` of the same records (same seed, same
    weight) with PAS-augmented prompts, written once to `directory`/<category>.jsonl."""
    os.makedirs(directory, exist_ok=True)
    d = sft.data
    for index, (category, source) in enumerate(list(d.train.items())):
        path = os.path.join(directory, f"{category}.jsonl")
        if not os.path.isfile(path):
            records, _ = load_records(source.path, category=category, fmt=source.format,
                                      skip_bad_records=d.skip_bad_records, seed=sft.seed + index,
                                      num_embedded=d.num_embedded, embedded=source.get("embedded"),
                                      tfds_data_dir=source.tfds_data_dir)
            augmented = augmented_records(records, pas)
            write_jsonl(path + ".tmp", [dict(r, category=f"{category}_pas") for r in augmented])
            os.replace(path + ".tmp", path)  # a file that exists is complete
            logger.info("pipeline: %d %s prompts augmented by PAS -> %s", len(records), category, path)
        d.train[f"{category}_pas"] = ml_collections.ConfigDict(dict(
            path=path, weight=source.weight, format="chat", tfds_data_dir=""))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    steps = {}
    prepare_specialist = None
    if config.augment == "pas":
        steps["pas"] = run_step("pas", copy(config.pas), workdir)
        pas = LazyPas(os.path.join(workdir, "pas", "pas_model"), config.pas.max_new_tokens)
        prepare_specialist = lambda sft, directory: add_augmented_sources(sft, os.path.join(directory, "augmented"),
                                                                          pas)
    steps["base"] = run_step("base", copy(config.base), workdir)
    base = os.path.join(workdir, "base", "checkpoints")
    for name, specialist in config.specialists.items():
        specialist = copy(specialist)
        specialist.init_from = base
        steps[name] = run_step(name, specialist, workdir, prepare_specialist)

    merge = copy(config.merge)
    merge.merge.update(models=tuple(os.path.join(workdir, name, "checkpoints") for name in config.specialists),
                       base=base, output="", overwrite=True)  # overwrite: a merge killed after its rename reruns
    steps["merge"] = run_step("merge", merge, workdir)
    merged = os.path.join(workdir, "merge", "merged")

    rm = copy(config.rm)
    rm.init_from = merged
    steps["rm"] = run_step("rm", rm, workdir)

    grpo = copy(config.grpo)
    grpo.init_from = merged
    if config.reward_model_weight:
        grpo.rewards.reward_model = dict(weight=config.reward_model_weight,
                                         checkpoint=os.path.join(workdir, "rm", "checkpoints"))
    steps["grpo"] = run_step("grpo", grpo, workdir)

    evaluated = {"base": steps["base"]["workdir"], **{n: steps[n]["workdir"] for n in config.specialists},
                 "merge": merged, "grpo": steps["grpo"]["workdir"]}
    evaluation = copy(config.eval)
    evaluation.checkpoints = ",".join(f"{name}={path}" for name, path in evaluated.items())
    steps["eval"] = run_step("eval", evaluation, workdir)

    rows = report_rows(steps, evaluated, workdir)
    write_report(rows, workdir)
    return steps


# ---- the report ----------------------------------------------------------------------------------------------

def _notes(name: str, step: dict) -> str:
    """The step's key numbers from its own summary."""
    s = step["summary"]
    if step["stage"] == "pas":
        held = s.get("held_out", {})
        return (f"PAS model: {held.get('held_out_prompts')} held-out prompts, rule pass rate "
                f"{_num(held.get('rule_pass_rate'))}, ROUGE-L vs teacher {_num(held.get('rouge_l_vs_teacher'))}")
    if step["stage"] == "sft":
        return f"{s.get('steps')} steps, held-out loss {_num(s.get('final_eval', {}).get('loss'))}"
    if step["stage"] == "merge":
        return f"{s.get('method')} of {len(s.get('models', []))} models over the base, {s.get('tensors')} tensors"
    if step["stage"] == "rm":
        final = s.get("final_eval", {})
        return f"{s.get('steps')} steps, held-out pair accuracy {_num(final.get('accuracy'))}"
    if step["stage"] == "grpo":
        return (f"{s.get('steps')} RL steps; its held-out log (correct: total reward >= 1) "
                f"{_num(s.get('accuracy_before'))} -> {_num(s.get('accuracy_after'))}")
    return f"{len(s)} checkpoints on {', '.join(sorted({b for per in s.values() for b in per}))}"


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def report_rows(steps: dict, evaluated: dict, workdir: str) -> list[dict]:
    """One row per step: stage, checkpoint, wall time, the evaluation's accuracy (overall and per category) for
    the steps that made a model, and the step's own key numbers."""
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        results = json.load(f)
    rows = []
    for name, step in steps.items():
        scores = {}
        arithmetic = results.get(name, {}).get("arithmetic") if name in evaluated else None
        if arithmetic:
            scores = {"accuracy": arithmetic["metrics"]["accuracy"], **arithmetic.get("categories", {})}
        checkpoint = os.path.relpath(evaluated[name], workdir) if name in evaluated else ""
        rows.append(dict(step=name, stage=step["stage"], checkpoint=checkpoint, seconds=step["seconds"],
                         scores=scores, notes=_notes(name, step)))
    return rows


def report_markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    known = [r["seconds"] for r in rows if r["seconds"] is not None]
    lines = ["# Pipeline report", "",
             "Accuracy: greedy answers to the evaluation step's held-out arithmetic problems, scored by the math "
             "reward GRPO trains on (eval/summary.md and eval/charts/ have the full evaluation). Wall s: the run "
             "that finished the step (after a restart, the resumed part only).", "",
             "| step | stage | checkpoint | wall s | " + " | ".join(columns) + " | key numbers |",
             "|---" * (len(columns) + 5) + "|"]
    for r in rows:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cells = [_num(r["scores"].get(c)) for c in columns]
        lines.append(f"| {r['step']} | {r['stage']} | {r['checkpoint'] or '-'} | {seconds} | "
                     + " | ".join(cells) + f" | {r['notes']} |")
    lines += ["", f"Total wall time of the steps: {sum(known):.0f} s"
              + (f" ({len(rows) - len(known)} step(s) without a recorded time)" if len(known) < len(rows) else ""),
              ""]
    return "\n".join(lines)


def report_chart(rows: list[dict], path: str) -> None:
    """Grouped bars: for each evaluated step (in pipeline order) its overall and per-category accuracy."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["scores"]]
    columns = list(dict.fromkeys(k for r in scored for k in r["scores"]))
    width = 0.8 / max(1, len(columns))
    x = np.arange(len(scored))
    fig, ax = plt.subplots(figsize=(1.4 * len(scored) + 2, 3.6))
    for i, column in enumerate(columns):
        bars = ax.bar(x + (i - (len(columns) - 1) / 2) * width, [r["scores"].get(column, 0.0) for r in scored],
                      width, label=column)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [r["step"] for r in scored])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("arithmetic accuracy along the pipeline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], workdir: str) -> None:
    with open(os.path.join(workdir, "pipeline_report.md"), "w") as f:
        f.write(report_markdown(rows))
    report_chart(rows, os.path.join(workdir, "pipeline_report.png"))
    logger.info("pipeline report: %s", os.path.join(workdir, "pipeline_report.md"))
