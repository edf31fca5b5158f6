"""The generate stage end to end (JSONL in, JSONL out), stop strings, and weight loading for the engine."""
import json

import jax
import numpy as np
import pytest

from alignment.config import load_config_file
from alignment.data.tokenizer import load_tokenizer
from alignment.generation.loading import build_engine
from alignment.generation.text import finish, stop_token_ids
from alignment.launch import dry_run
from alignment.models.hf import save_hf_checkpoint
from alignment import stages
from tests import REPO

CONFIG = REPO / "configs" / "generate.py"


def small_config(**overrides):
    config = load_config_file(str(CONFIG))
    config.update(dict(num_embedded=3, max_new_tokens=8, prompts_per_call=4), **overrides)
    stages.check(config)
    return config


def test_default_config_dry_run():
    text = dry_run(small_config())
    assert "stage: generate" in text and "parameters: 1,049,728" in text


def test_embedded_prompts_end_to_end(tmp_path):
    summary = stages.run("generate", small_config(num_samples=2), str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert len(lines) == 3 and summary["prompts"] == 3 and summary["completions"] == 6
    for line in lines:
        assert [m["role"] for m in line["messages"]] == ["user"]  # the worked answer is not in the prompt
        assert line["reference"][0]["role"] == "assistant" and "answer" in line
        assert len(line["completions"]) == 2
        assert all(0 < c["num_tokens"] <= 8 for c in line["completions"])
    assert sum(summary["finish_reasons"].values()) == 6
    assert json.load(open(tmp_path / "summary.json"))["new_tokens"] == summary["new_tokens"]


def test_jsonl_prompts_long_ones_skipped_and_counted(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "What is 1 + 1?"}], "id": "a"},
            {"messages": [{"role": "user", "content": "1 + " * 400}], "id": "long"},
            {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What is 3 - 2?"}], "id": "b"}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    summary = stages.run("generate", small_config(prompts=str(prompts), output=str(out), too_long="skip"), str(tmp_path))
    assert summary["skipped_too_long"] == 1 and summary["prompts"] == 2
    assert [json.loads(line)["id"] for line in open(out)] == ["a", "b"]
    with pytest.raises(ValueError, match=f"{prompts}:2: prompt of .* exceeds the context length"):
        stages.run("generate", small_config(prompts=str(prompts), output=str(out)), str(tmp_path))


def test_bad_prompt_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + '{"text": "no messages"}\n')
    with pytest.raises(ValueError, match=f"{bad}:2: expected a non-empty list field 'messages'"):
        stages.run("generate", small_config(prompts=str(bad)), str(tmp_path))
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:1: .*unknown role 'robot'"):
        stages.run("generate", small_config(prompts=str(bad)), str(tmp_path))


def test_stop_strings_cut_text_and_count_tokens():
    tokenizer = load_tokenizer("embedded")
    ids = tokenizer.encode("The answer is 14. Next question")
    done = finish(tokenizer, ids, stopped=False, stop=[". Next"])
    assert done["text"] == "The answer is 14" and done["finish_reason"] == "stop"
    assert tokenizer.decode(ids[: done["num_tokens"]]).find(". Next") >= 0
    assert tokenizer.decode(ids[: done["num_tokens"] - 1]).find(". Next") < 0
    end = tokenizer.token_id("<|im_end|>")
    assert end in stop_token_ids(tokenizer, "chatml") and tokenizer.eos_id in stop_token_ids(tokenizer, "chatml")
    stopped = finish(tokenizer, ids + [end], stopped=True)
    assert stopped == {"text": "The answer is 14. Next question", "num_tokens": len(ids) + 1, "finish_reason": "stop"}
    assert finish(tokenizer, ids, stopped=False)["finish_reason"] == "length"


def test_engine_loads_hf_weights(tmp_path):
    random_engine, _ = build_engine(small_config(seed=3))
    save_hf_checkpoint(tmp_path / "hf", random_engine.config, random_engine.params)
    loaded, _ = build_engine(small_config(init_from=str(tmp_path / "hf")))
    for a, b in zip(jax.tree.leaves(random_engine.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
