"""The side-by-side harness: ratios only from the medians of the runs it made (a time's ratio inverted), the
machine record, and no benchmark comparing against a figure it did not measure."""
import re

import pytest

from benchmarks import side_by_side
from tests import REPO


def runs(*values, bench="preference_rm", key="pairs_per_s"):
    return [{"results": [{"bench": "preference_data"}, {"bench": bench, key: v}]} for v in values]


def test_throughput_ratio_is_ours_over_the_peer_from_medians():
    ours = runs(4.0, 6.0, 5.0)
    peer = [{"results": [{"bench": "rm_trl", "pairs_per_s": v}]} for v in (2.0, 2.5, 3.0)]
    (row,) = side_by_side.compare("rm", "bf16", ours, peer)
    assert (row["ours_median"], row["peer_median"], row["ratio"]) == (5.0, 2.5, 2.0)


def test_a_time_ratio_is_the_peers_over_ours_and_lengths_get_no_ratio():
    ours = [{"results": [{"bench": "grpo", "median_step_s": 2.0, "mean_completion_length": 120.0}]}]
    peer = [{"results": [{"bench": "grpo_trl", "median_step_s": 9.0, "mean_completion_len": 127.5}]}]
    step, length = side_by_side.compare("grpo", "fp32", ours, peer)
    assert step["ratio"] == 4.5
    assert (length["ours_median"], length["peer_median"]) == (120.0, 127.5) and "ratio" not in length


def test_a_failed_side_gives_no_ratio():
    (row,) = side_by_side.compare("dpo", "fp32", runs(1.0, bench="preference_dpo_online"), [{"results": []}])
    assert row["peer"] == [] and "ratio" not in row


def test_generate_reads_the_engine_prefixed_keys_too():
    ours = [{"results": [{"bench": "generate", **{f"v2_{k}": 100.0 for k in side_by_side.GENERATE}}]}]
    peer = [{"results": [{"bench": "generate_hf", **{k: 50.0 for k in side_by_side.GENERATE}}]}]
    rows = side_by_side.compare("generate", "bf16", ours, peer)
    assert [r["metric"] for r in rows] == side_by_side.GENERATE and all(r["ratio"] == 2.0 for r in rows)


def test_generation_rows_are_set_against_the_decode_bound_of_their_dtype_and_batch():
    rows = [{"item": "generate", "precision": "bf16", "metric": "b16_greedy_tokens_per_s", "ours_median": 500.0},
            {"item": "generate", "precision": "fp32", "metric": "b1_top_p_tokens_per_s", "ours_median": 40.0},
            {"item": "rm", "precision": "bf16", "metric": "pairs_per_s", "ours_median": 5.0}]
    side_by_side.add_bound(rows, {"bfloat16_b16": {"bound_tokens_per_s": 1000.0},
                                  "float32_b1": {"bound_tokens_per_s": 50.0}})
    assert [r.get("ours_fraction_of_bound") for r in rows] == [0.5, 0.8, None]


def test_result_lines_skip_logs_and_broken_json():
    text = 'INFO something\n{"bench": "x", "a": 1}\n{not json\n  {"indented": 1}\n'
    assert side_by_side.result_lines(text) == [{"bench": "x", "a": 1}]


def test_machine_names_the_cpu_and_its_bf16_flags():
    record = side_by_side.machine()
    assert record["cores"] >= 1 and record["cpu"]
    assert set(record["flags"]) >= {"amx_bf16", "avx512_bf16", "avx2"}


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("bench_*.py")), ids=lambda p: p.name)
def test_no_benchmark_prints_a_ratio_against_a_figure_from_elsewhere(path):
    """A hard-coded peer figure (PEER = {...}) or a speedup computed from one: ratios come from side_by_side."""
    text = path.read_text()
    assert not re.search(r"^PEER\w* = \{", text, re.M) and "speedup_vs" not in text, path.name
