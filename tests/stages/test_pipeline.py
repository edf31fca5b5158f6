"""The pipeline stage: configs/pipeline.py shortened to a few steps per stage runs every step in order, wires each
step's outputs into the next, writes one report row per step, reuses finished steps on a rerun (no training) and
resumes at an interrupted one."""
import json
import os
import re
import time

import ml_collections
import pytest

from alignment import stages
from alignment.config import load_config_file
from alignment.data.sources import load_records
from alignment.stages import pipeline
from tests import REPO

STEPS = ["pas", "base", "addition", "subtraction", "merge", "rm", "grpo", "eval"]


def shortened() -> ml_collections.ConfigDict:
    """configs/pipeline.py with every step cut to seconds of work."""
    c = load_config_file(str(REPO / "configs" / "pipeline.py"))
    c.pas.data.update(num_embedded=60, max_eval=4)
    c.pas.selection.enabled = False  # its embedder costs more compile time than the rest of the PAS step
    c.pas.sft.update(steps=6, eval_every=0, log_every=3)
    c.pas.max_new_tokens = 12
    for sft in (c.base, *c.specialists.values()):
        sft.update(steps=4, batch_size=8, log_every=2)
        sft.eval_every = 0
        sft.checkpoint.every = 0
        sft.data.update(num_embedded=96, num_embedded_eval=16, max_length=96)
    c.rm.update(steps=3, batch_size=8, eval_every=0, log_every=3)
    c.rm.data.update(num_embedded=48, num_embedded_eval=16)
    c.grpo.steps = 2
    c.grpo.rl.update(prompts_per_step=4, num_samples=2, eval_every=2, max_new_tokens=12)
    c.grpo.data.update(num_embedded=32, num_embedded_eval=16)
    c.eval.arithmetic.update(num_problems=16, max_tokens=12)
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    start = time.perf_counter()
    summary = stages.run("pipeline", shortened(), workdir)
    return workdir, summary, time.perf_counter() - start


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_every_step_runs_in_order_and_the_report_has_one_row_per_step(finished):
    workdir, summary, seconds = finished
    assert list(summary) == STEPS
    assert [summary[s]["stage"] for s in STEPS] == ["pas", "sft", "sft", "sft", "merge", "rm", "grpo", "eval"]
    for step in STEPS:
        assert not summary[step]["reused"] and summary[step]["seconds"] > 0
        assert read_json(workdir, step, "summary.json") == json.loads(json.dumps(summary[step]["summary"]))
    assert read_json(workdir, "summary.json") == json.loads(json.dumps(summary))
    report = open(os.path.join(workdir, "pipeline_report.md")).read()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    assert [row.split(" | ")[0][2:] for row in rows] == STEPS
    assert "| accuracy | addition | subtraction |" in report
    results = read_json(workdir, "eval", "results.json")
    assert list(results) == ["base", "addition", "subtraction", "merge", "grpo"]
    for name, per in results.items():
        arithmetic = per["arithmetic"]
        assert sorted(arithmetic["categories"]) == ["addition", "subtraction"]
        accuracy = arithmetic["metrics"]["accuracy"]
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        assert f"| {accuracy:.3f} | {arithmetic['categories']['addition']:.3f} |" in row
    assert os.path.getsize(os.path.join(workdir, "pipeline_report.png")) > 1000
    print(f"shortened pipeline: {seconds:.0f} s")


def test_each_step_starts_from_the_outputs_of_the_steps_before(finished):
    workdir, _, _ = finished
    base = os.path.join(workdir, "base", "checkpoints")
    specialists = [os.path.join(workdir, name, "checkpoints") for name in ("addition", "subtraction")]
    merged = os.path.join(workdir, "merge", "merged")
    for name in ("addition", "subtraction"):
        config = read_json(workdir, name, "config.json")
        assert config["init_from"] == base
        augmented = config["data"]["train"][f"{name}_pas"]["path"]
        assert augmented == os.path.join(workdir, name, "augmented", f"{name}.jsonl")
    merge = read_json(workdir, "merge", "config.json")["merge"]
    assert (merge["method"], merge["models"], merge["base"]) == ("model_stock", specialists, base)
    assert read_json(workdir, "rm", "config.json")["init_from"] == merged
    grpo = read_json(workdir, "grpo", "config.json")
    assert grpo["init_from"] == merged
    assert grpo["rewards"]["reward_model"] == {"weight": 0.1, "checkpoint": os.path.join(workdir, "rm", "checkpoints")}
    checkpoints = read_json(workdir, "eval", "config.json")["checkpoints"]
    assert checkpoints == ",".join([f"base={workdir}/base", f"addition={workdir}/addition",
                                    f"subtraction={workdir}/subtraction", f"merge={merged}", f"grpo={workdir}/grpo"])


def test_specialists_train_on_their_operation_with_and_without_pas(finished):
    workdir, _, _ = finished
    for name, sign in (("addition", "+"), ("subtraction", "-")):
        config = read_json(workdir, name, "config.json")
        raw, _ = load_records("embedded", category=name, seed=config["seed"],
                                       num_embedded=config["data"]["num_embedded"],
                                       embedded=config["data"]["train"][name]["embedded"])
        with open(config["data"]["train"][f"{name}_pas"]["path"]) as f:
            augmented = [json.loads(line) for line in f]
        assert len(augmented) == len(raw) == 96
        for plain, pas in zip(raw, augmented):
            prompt = plain["messages"][0]["content"]
            assert re.fullmatch(rf"What is \d {re.escape(sign)} \d\?", prompt)
            assert pas["messages"][0]["content"].startswith(prompt + "\n\n")  # the complement follows the prompt
            assert pas["messages"][1:] == plain["messages"][1:] and pas["answer"] == plain["answer"]
            assert pas["category"] == f"{name}_pas"


def test_a_rerun_reuses_every_step_without_training(finished, monkeypatch):
    workdir, summary, _ = finished
    mtimes = {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in STEPS}

    def no_stage(name, *args, **kwargs):
        raise AssertionError(f"the {name} stage ran again")

    monkeypatch.setattr(stages, "run", no_stage)
    start = time.perf_counter()
    again = pipeline.run(shortened(), workdir)
    assert time.perf_counter() - start < 20
    assert list(again) == STEPS and all(again[s]["reused"] for s in STEPS)
    assert [again[s]["seconds"] for s in STEPS] == [summary[s]["seconds"] for s in STEPS]
    assert {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in STEPS} == mtimes


def test_a_restart_resumes_at_the_interrupted_step(finished, monkeypatch):
    """A kill during GRPO leaves no grpo/ or eval/ summary: the rerun runs those two only, GRPO from its checkpoint."""
    workdir, _, _ = finished
    for step in ("grpo", "eval"):
        os.remove(os.path.join(workdir, step, "summary.json"))
    ran, real_run = [], stages.run

    def recording(name, config, directory):
        ran.append(os.path.basename(directory))
        return real_run(name, config, directory)

    monkeypatch.setattr(stages, "run", recording)
    again = pipeline.run(shortened(), workdir)
    assert ran == ["grpo", "eval"]
    assert [s for s in STEPS if not again[s]["reused"]] == ["grpo", "eval"]
    assert again["grpo"]["summary"]["steps"] == 2


def test_augmented_records_ask_pas_once_per_distinct_prompt():
    class Brackets:
        asked = []

        def augment_chats(self, chats):
            self.asked += chats
            return [[*c[:-1], {"role": "user", "content": f"{c[-1]['content']}\n\n[{c[-1]['content']}]"}]
                    for c in chats]

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": a,
                "encoded": object()} for q, a in (("1+1?", "2"), ("2+2?", "4"), ("1+1?", "two"))]
    pas = Brackets()
    out = pipeline.augmented_records(records, pas)
    assert [c[0]["content"] for c in pas.asked] == ["1+1?", "2+2?"]
    assert [r["messages"][0]["content"] for r in out] == ["1+1?\n\n[1+1?]", "2+2?\n\n[2+2?]", "1+1?\n\n[1+1?]"]
    assert [r["messages"][1]["content"] for r in out] == ["2", "4", "two"]
    assert all("encoded" not in r and r["answer"] == r["messages"][1]["content"] for r in out)


def test_without_pas_there_is_no_pas_step():
    config = load_config_file(str(REPO / "configs" / "pipeline.py"))
    config.augment = "none"
    config.pas.sft.steps = 0  # not checked: the step does not run
    stages.check(config)
    assert list(pipeline.step_configs(config)) == STEPS[1:]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.specialists.update(merge=c.specialists.addition), "config.specialists.merge: the name of a pipeline"),
    (lambda c: c.specialists.update({"a,b": c.specialists.addition}), "use letters, digits"),
    (lambda c: setattr(c, "rm", c.grpo), "config.rm.stage='grpo': this step runs the 'rm' stage"),
    (lambda c: setattr(c, "specialists", ml_collections.ConfigDict()), "config.specialists is empty"),
    (lambda c: setattr(c.base, "steps", 0), "config.steps=0 must be > 0"),  # the step's own stage check
])
def test_bad_step_configs_fail_before_anything_runs(change, message, tmp_path):
    config = load_config_file(str(REPO / "configs" / "pipeline.py"))
    change(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        stages.run("pipeline", config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
