"""The one-command device check at small shapes on CPU: every section runs, its JSON is complete and written."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import device_check


def test_small_check_runs_every_section_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    result = device_check.main(["--small", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["mode"] == "small" and result["device"]["backend"] == "cpu"
    assert result["failures"] == [] and result["correct"] is True
    sections = result["sections"]
    assert set(sections) == set(device_check.SECTIONS)

    checks = {item["name"]: item for item in sections["correctness"]}
    dtypes = ("bfloat16", "float32")
    expected = {f"attention pallas {d}" for d in dtypes} | {
        f"fused {impl} {kl} {d}" for impl in ("pallas", "xla") for kl in ("top_k", "k3") for d in dtypes}
    assert set(checks) == expected  # no cuDNN off a GPU
    for item in checks.values():
        assert item["ok"] and max(item["max_rel_err"].values()) < item["tolerance"], item
    assert set(checks["fused pallas top_k float32"]["max_rel_err"]) == {"logp", "entropy", "kl", "dhidden",
                                                                       "dunembedding"}

    timed = {item["name"]: item for item in sections["speed"]}
    assert set(timed) == {"attention pallas (64, 64)", "attention xla", "fused loss pallas", "fused loss xla",
                          "fused loss reference"}
    for item in timed.values():
        assert item["ms"] > 0 and item["tflops"] > 0 and 0 < item["fraction_of_peak"]
    assert timed["fused loss reference"]["temp_gib"] >= 0

    (sft,) = sections["sft"]
    rows, seq, _ = device_check.SMALL.sft_rows
    assert sft["attention_impl_used"] == "xla" and sft["rows"] == rows and sft["seq"] == seq  # "pallas" falls back
    assert 0 < sft["mfu"] < 1 and math.isfinite(sft["loss"]) and sft["tokens_per_s"] > 0

    (grpo,) = sections["grpo"]
    prompts, samples, _, new_tokens = device_check.SMALL.grpo_rollout
    assert grpo["generated_tokens"] == prompts * samples * new_tokens  # no stop ids: every row runs to the limit
    assert grpo["rollout_tokens_per_s"] > 0 and grpo["update_s"] > 0 and math.isfinite(grpo["loss"])


def test_a_failing_item_is_reported_and_the_budget_skips_sections(capsys):
    report = device_check.Report(budget_s=100)
    assert report.attempt("speed", "broken", lambda: 1 / 0) is None
    assert report.attempt("speed", "fine", lambda: {"ms": 1.0})["ms"] == 1.0
    broken, fine = report.sections["speed"]
    assert broken["error"].startswith("ZeroDivisionError") and "fine" not in str(report.failures)
    assert report.failures == ["speed/broken: ZeroDivisionError: division by zero"]

    result = device_check.run(("sft", "grpo"), small=False, budget_s=0)  # full mode: nothing fits in 0 s
    assert all(items[0]["skipped"].startswith("time budget") for items in result["sections"].values())
    with pytest.raises(SystemExit):
        device_check.main(["--sections", "correctness,flops"])
    assert "unknown ['flops']" in capsys.readouterr().err
