"""The synth stage: config checks before anything runs, a resumed run replaying its calls, a hostile endpoint
counted instead of crashing the run, and every recipe's output read by the SFT and DPO stages' loaders."""
import json
import threading

import pytest

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.data import preference, sources
from alignment.data.chat import encode_chat
from alignment.data.tokenizer import load_tokenizer
from alignment.generation.http_server import RequestError, make_server


def config(recipe: str, **options):
    c = load_config_file(config_path(f"synth/{recipe}"))
    c[recipe].update(options)
    return c


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(recipe="math"), "config.recipe='math' needs its options block config.math"),
    (lambda c: c.critic.update(enabled=False), "has checks only a critic can make"),
    (lambda c: c.constraints.update(min_constraints=4), "min_constraints=4 is more than max_constraints=3"),
    (lambda c: c.constraints.update(checks="ifeval,vibes"), "['vibes'] not among"),
    (lambda c: c.teacher.update(flaw_rate=2.0), "config.teacher.flaw_rate=2.0 must be >= 0 and <= 1"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, change, message):
    c = config("constraints")
    change(c)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        stages.run("synth", c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_rerun_resumes_from_the_call_cache(tmp_path):
    c = config("constraints", num_items=30)
    first = stages.run("synth", c, str(tmp_path))
    data = (tmp_path / "sft.jsonl").read_text()
    again = stages.run("synth", c, str(tmp_path))
    assert again["teacher_calls"] == again["critic_calls"] == 0
    assert again["cached_calls"] == first["teacher_calls"] + first["critic_calls"]
    assert (tmp_path / "sft.jsonl").read_text() == data
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()  # killed half way, the last line torn
    (tmp_path / "calls.jsonl").write_text("\n".join(lines[:len(lines) // 2]) + "\n" + lines[-1][:20])
    resumed = stages.run("synth", c, str(tmp_path))
    assert 0 < resumed["teacher_calls"] + resumed["critic_calls"] < first["teacher_calls"] + first["critic_calls"]
    assert (tmp_path / "sft.jsonl").read_text() == data


class Hostile:
    """An OpenAI-compatible endpoint answering garbage, errors and wrong shapes."""

    def models(self):
        return {"object": "list", "data": []}

    def completions(self, body):
        raise RequestError("no", status=404)

    def chat_completions(self, body):
        text = json.dumps(body["messages"])
        kind = sum(map(ord, text)) % 4
        if kind == 0:
            raise RequestError("model exploded", status=400)
        content = ["", "```python\nwhile True: pass\n```", {"not": "text"}, "x" * 5000][kind]
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}


@pytest.mark.parametrize("recipe", ["constraints", "math", "code", "system_messages"])
def test_a_hostile_endpoint_is_counted_not_fatal(tmp_path, recipe):
    server = make_server(Hostile())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    c = config(recipe, num_items=12)
    c.teacher.update(url=f"http://127.0.0.1:{server.server_address[1]}", timeout=10.0)
    try:
        if recipe == "system_messages":
            with pytest.raises(ValueError, match="seed system prompts could be decomposed"):
                stages.run("synth", c, str(tmp_path))
            return
        summary = stages.run("synth", c, str(tmp_path))
    finally:
        server.shutdown()
    assert summary["records"] == 0 and sum(summary["dropped"].values()) == summary["items"]
    assert summary["dropped"] or "label:endpoint_error" in summary["filtered"]


def test_every_recipe_writes_records_the_sft_and_dpo_stages_read(tmp_path):
    """The preferences recipe (running constraints and math first), then every record through the SFT stage's
    reader and chat encoding and every pair through the DPO stage's pair parser; bad records would raise."""
    c = config("preferences", recipes="constraints,math,reasoning,code,system_messages,teacher_style",
               items_per_recipe=12)
    summary = stages.run("synth", c, str(tmp_path))
    assert summary["pairs"] > 0 and len(summary["recipes"]) == 6
    tokenizer = load_tokenizer("embedded")
    encode = lambda messages: encode_chat(tokenizer, messages, "chatml")  # noqa: E731
    for name in summary["recipes"]:
        records, stats = sources.load_records(str(tmp_path / name / "sft.jsonl"), category="synth", encode=encode)
        assert len(records) == summary["recipes"][name]["records"] and not stats.skipped
        assert all(r["category"] != "synth" for r in records)  # each record names its own category
    for line in open(tmp_path / "pairs.jsonl"):
        record = json.loads(line)
        (parsed,) = preference.record_to_pairs(record)
        assert parsed.chosen[0]["content"] == record["chosen"] and record["rejected_failures"]


def test_the_embedded_teacher_speaks_the_runs_own_taxonomy(tmp_path):
    """A taxonomy of a dozen types: the stand-in's reversal instructions list the same types the recipe's do."""
    from alignment.synth import constraints, response_reversal

    kept = set(response_reversal.MEASURED[:12])
    types = [dict(t, conflicts=[c for c in t["conflicts"] if c in kept])
             for t in json.load(open(constraints.TAXONOMY_PATH))["types"] if t["id"] in kept]
    (tmp_path / "taxonomy.json").write_text(json.dumps({"types": types}))
    c = config("reversal", num_items=16, taxonomy=str(tmp_path / "taxonomy.json"))
    summary = stages.run("synth", c, str(tmp_path / "run"))
    assert summary["records"] > 0 and "endpoint_error" not in summary["dropped"]
