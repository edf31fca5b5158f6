"""Input pools: records checked field by field in one-line errors, seed prompts from a file (another recipe's chat
records too) or the PAS pool, and the shipped data in an install tree."""
import json
import subprocess
import sys

import pytest

from alignment.synth import pools
from tests import REPO


def test_seed_prompts_come_from_prompts_or_chat_records(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps({"prompt": "Write a haiku.", "category": "writing"}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "Explain tides."},
                                             {"role": "assistant", "content": "..."}], "id": "x"}) + "\n")
    seeds = pools.seed_prompts(str(path), 10, "", seed=0)
    assert [(s["prompt"], s["category"]) for s in seeds] == [("Write a haiku.", "writing"),
                                                             ("Explain tides.", "general")]
    assert seeds[1]["id"] == "x"
    embedded = pools.seed_prompts(pools.EMBEDDED, 50, "knowledge", seed=0)
    assert len(embedded) == 50 and {s["category"] for s in embedded} == {"knowledge"}
    assert len({s["prompt"] for s in embedded}) == 50


def test_bad_records_fail_naming_file_line_and_field(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"text": "ok", "quality": 3}) + "\n" + json.dumps({"text": "", "quality": 3}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: field 'text' must be a non-empty str"):
        pools.read_records(str(path), {"text": str})
    path.write_text(json.dumps({"text": "ok", "quality": True}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: field 'quality' must be a non-empty int or float"):
        pools.read_records(str(path), {"text": str, "quality": (int, float)})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        pools.read_records(str(tmp_path / "empty.jsonl"))


def test_the_shipped_data_is_installed_with_the_package(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                   check=True, capture_output=True)
    shipped = sorted(p.name for p in (REPO / "alignment" / "synth" / "data").iterdir())
    assert sorted(p.name for p in (tmp_path / "alignment" / "synth" / "data").iterdir()) == shipped
