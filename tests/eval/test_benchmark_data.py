"""Benchmark data on a fresh install: IFEval's prompts ship with the package, every other benchmark's file is a
path the user gives (a missing one fails before anything runs, saying where to get it), no config default points
outside the package, and HumanEval problems whose tests cannot be judged are skipped and reported, not fatal."""
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from alignment import stages
from alignment.config import flatten_keys, load_config_file, lookup
from alignment.eval import benchmarks, report, runner
from alignment.data.jsonl_cache import JsonlCache
from tests.eval.test_endpoint import FakeOpenAI
from tests import REPO

ROOT = REPO
PACKAGE = ROOT / "alignment"
SHIPPED = PACKAGE / "eval" / "data" / "ifeval"
FIXTURES = ROOT / "tests" / "fixtures" / "eval"
SHARED = ROOT.parent / "shared"  # the development data folder (conftest's SHARED_DATA) that users do not have

# Paths opened while `_opened()` records (an audit hook sees every open, whoever calls it; hooks cannot be
# removed, so it is installed once and idles outside the block).
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def _opened():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _eval_config(**overrides):
    config = load_config_file(str(ROOT / "configs" / "eval.py"))
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        (lookup(config, parent) if parent else config)[leaf] = value
    return config


def _lowercase_without_commas(model: str, messages: list) -> str:
    return "here is my answer. it has no capital letters and no commas at all."


def test_ifeval_runs_from_the_shipped_prompts_and_reads_nothing_outside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared beside the working directory either
    with FakeOpenAI(_lowercase_without_commas) as server, _opened() as opened:
        config = _eval_config(benchmarks="ifeval", endpoint=server.url, limit=120)  # HTTP is the slow part
        assert config.data.ifeval == ""
        stages.run("eval", config, str(tmp_path / "run"))
    assert not [p for p in opened if p == str(SHARED) or p.startswith(str(SHARED) + os.sep)]
    assert [p for p in opened if p.endswith("input_data.jsonl")] == [str(SHIPPED / "input_data.jsonl")]

    results = json.loads((tmp_path / "run" / "results.json").read_text())["default"]["ifeval"]
    assert len(results["samples"]) == 120 and len(server.requests) == 120
    # The canned reply is lowercase English without commas; these instructions' outcomes follow from that alone.
    expected = {"punctuation:no_comma": True, "change_case:english_lowercase": True,
                "change_case:english_capital": False, "startend:quotation": False}
    seen = {k: 0 for k in expected}
    for sample in results["samples"]:
        for instruction_id, ok in zip(sample["instruction_ids"], sample["strict"]):
            if instruction_id in expected:
                assert ok is expected[instruction_id], (sample["id"], instruction_id)
                seen[instruction_id] += 1
    assert all(seen.values()), seen
    assert 0 < results["metrics"]["prompt_strict"] < 1


def test_the_shipped_prompts_are_the_published_file():
    lines = (SHIPPED / "input_data.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 541 and len({r["key"] for r in records}) == 541
    assert records[0]["key"] == 1000 and records[-1]["key"] == 3757
    assert len(benchmarks.load_ifeval(str(SHIPPED / "input_data.jsonl"), 0, 0)) == 541  # every instruction known
    assert "Apache License" in (SHIPPED / "LICENSE").read_text()
    notes = (SHIPPED / "README.md").read_text()
    assert "google-research/google-research" in notes and "CC BY 4.0" in notes


def test_an_installed_package_carries_the_prompts(tmp_path):
    """setup.py's package data laid out as an install does, used from a directory with nothing beside it: the
    shipped eval config, checked and loaded, reads the shipped prompts."""
    build = tmp_path / "install"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=ROOT, check=True,
                   capture_output=True)
    shipped = build / "alignment" / "eval" / "data" / "ifeval"
    assert sorted(p.name for p in shipped.iterdir()) == ["LICENSE", "README.md", "input_data.jsonl"]
    script = ("from alignment import config, stages; from alignment.stages import eval as stage; "
              "c = config.load_config_file(config.config_path('eval')); c.benchmarks = 'ifeval'; "
              "c.endpoint = 'http://127.0.0.1:9/v1'; stages.check(c); "
              "print(config.config_path('eval'), stage.data_file(c, 'ifeval'), len(stage.load_samples(c)['ifeval']))")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    out = subprocess.run([sys.executable, "-c", script], cwd=workdir, env={**os.environ, "PYTHONPATH": str(build)},
                         check=True, capture_output=True, text=True).stdout.split()
    assert out == [str(build / "alignment_configs" / "eval.py"), str(shipped / "input_data.jsonl"), "541"]


@pytest.mark.parametrize("name, where, fields", [
    ("gsm8k", "github.com/openai/grade-school-math", "{question, answer}"),
    ("cfbench", "github.com/PKU-Baichuan-MLSystemLab/CFBench", "{idx, prompt, criteria"),
    ("math", "HuggingFaceH4/MATH-500", "{problem, answer"),
    ("humaneval", "github.com/openai/human-eval", "{task_id, prompt, test, entry_point}"),
    ("sysbench", "SysBench", "{id, system, turns"),
    ("fbbench", "FB-Bench", "{id, messages, checklist"),
    ("ux", "no public one", "{id, messages, criteria, category}"),
])
def test_a_benchmark_without_its_file_fails_before_anything_runs(tmp_path, name, where, fields):
    config = _eval_config(benchmarks=f"arithmetic,{name}", endpoint="http://127.0.0.1:9/v1",
                          **{"judge.endpoint": "http://127.0.0.1:9/v1"})
    with pytest.raises(ValueError) as error:
        stages.run("eval", config, str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith(f"benchmark {name!r} needs config.data.{name}: ") and "\n" not in message
    assert where in message and fields in message, message
    assert not (tmp_path / "run").exists()  # nothing ran


def test_a_missing_file_is_named_with_where_to_get_it(tmp_path):
    missing = str(tmp_path / "test.jsonl")
    config = _eval_config(benchmarks="gsm8k", **{"data.gsm8k": missing})
    expected = rf"config.data.gsm8k={re.escape(repr(missing))} is not a file; it should be the GSM8K test split"
    with pytest.raises(ValueError, match=expected + r".*openai/grade-school-math"):
        stages.check(config)
    (tmp_path / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "2\\n#### 2"}\n')
    stages.check(config)


def test_unknown_or_no_benchmark_is_refused_by_the_check():
    with pytest.raises(ValueError, match=r"unknown benchmark 'gsm9k'. Did you mean 'gsm8k'\? Available"):
        stages.check(_eval_config(benchmarks="gsm9k"))
    with pytest.raises(ValueError, match=r"config.benchmarks is empty"):
        stages.check(_eval_config(benchmarks=" , "))


def test_no_config_default_points_outside_the_package():
    for path in sorted((ROOT / "configs").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        config = load_config_file(str(path))
        for key in flatten_keys(config):
            value = lookup(config, key)
            if isinstance(value, str) and "://" not in value:
                assert not os.path.isabs(value) and ".." not in pathlib.PurePath(value).parts, (path.name, key, value)


# A HumanEval problem whose test is a loop: verdict cannot split it into calls and expected values.
UNSPLITTABLE = {"task_id": "t/loop", "prompt": "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n",
                "entry_point": "double",
                "test": "def check(candidate):\n    for x in range(3):\n        assert candidate(x) == 2 * x\n"}


def _humaneval_file(tmp_path) -> str:
    lines = (FIXTURES / "humaneval_small.jsonl").read_text().splitlines()
    path = tmp_path / "humaneval.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(UNSPLITTABLE), *lines[1:]]) + "\n")
    return str(path)


def test_humaneval_loading_skips_an_unjudgeable_problem_with_its_reason(tmp_path):
    samples = benchmarks.load_humaneval(_humaneval_file(tmp_path), 0, 0)
    kept, skipped = benchmarks.split_skipped(runner.expand(samples, 3))
    assert [s["id"] for s in kept] == ["t/0"] * 3 + ["t/1"] * 3
    assert [s["id"] for s in skipped] == ["t/loop"]  # once, however many copies
    assert "humaneval.jsonl:2: task 't/loop': line 2: cannot split `for x in range(3)" in skipped[0]["reason"]


def test_humaneval_skips_are_counted_in_results_and_summary(tmp_path, caplog):
    def good(model, messages):
        text = messages[-1]["content"]
        name, args, body = ("add", "a, b", "a + b") if "def add" in text else ("neg", "x", "-x")
        return f"```python\ndef {name}({args}):\n    return {body}\n```"

    with FakeOpenAI(good) as server:
        config = _eval_config(benchmarks="humaneval", endpoint=server.url, num_samples=2, pass_k="1,2",
                              **{"data.humaneval": _humaneval_file(tmp_path), "generation.temperature": 0.7})
        summary = stages.run("eval", config, str(tmp_path / "run"))
        assert len(server.requests) == 4  # two problems x two samples; nothing asked for the skipped one
    assert summary["default"]["humaneval"] == {"pass@1": 1.0, "pass@2": 1.0}  # over the judged problems only
    assert any("humaneval: skipping 1 of 3 samples" in r.getMessage() and "t/loop" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    results = json.loads((tmp_path / "run" / "results.json").read_text())["default"]["humaneval"]
    assert results["counts"] == {"skipped": 1}
    assert [s["id"] for s in results["skipped"]] == ["t/loop"] and "cannot split" in results["skipped"][0]["reason"]
    summary_md = (tmp_path / "run" / "summary.md").read_text()
    assert "| default | 4 | 1.0000 | 1.0000 | 1 |" in summary_md
    assert "Skipped 1 (not scorable; reasons in results.json): t/loop" in summary_md


def test_all_problems_unjudgeable_is_an_error_before_generation(tmp_path):
    path = tmp_path / "humaneval.jsonl"
    path.write_text(json.dumps(UNSPLITTABLE) + "\n")
    config = _eval_config(benchmarks="humaneval", endpoint="http://127.0.0.1:9/v1", **{"data.humaneval": str(path)})
    with pytest.raises(ValueError, match=r"benchmark 'humaneval': no samples to score in .*\(1 skipped; the first "
                                         r"because .*cannot split"):
        stages.run("eval", config, str(tmp_path / "run"))


def test_runner_reports_skips_without_the_stage(tmp_path):
    samples = benchmarks.load_humaneval(_humaneval_file(tmp_path), 0, 0)
    generate = lambda prompts, max_tokens: ["```python\ndef add(a, b):\n    return a - b\n```"] * len(prompts)
    result = runner.evaluate("humaneval", samples, generate, benchmarks.Context(),
                             JsonlCache(str(tmp_path / "cache.jsonl")), "g", max_tokens=64)
    assert result["counts"] == {"skipped": 1} and result["skipped"][0]["id"] == "t/loop"
    assert result["metrics"] == {"pass@1": 0.0} and len(result["samples"]) == 2
    assert "t/loop" in report.summary_markdown({"m": {"humaneval": result}})
