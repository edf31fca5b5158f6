"""Bad paths outside the config: a data path that is a directory, a --workdir that is a file, an empty prompt
file. Each is one error line naming the path, from the command line as a user meets it."""
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from alignment.data import preference, prompts, sources
from alignment.stages import generate

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch(config: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "alignment.launch", f"--config=configs/{config}.py", *args]
    return subprocess.run(command, cwd=REPO, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                          timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """A failed run whose output, log records aside, is exactly `error: <expected>`."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    not_logged = [line for line in lines if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert not_logged == [f"error: {expected}"], result.stderr


def test_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    assert_one_error_line(launch("sft", f"--workdir={workdir}"), f"--workdir {workdir} is a file, not a directory")
    assert_one_error_line(launch("sft", f"--workdir={workdir / 'sub'}"),
                          f"--workdir {workdir / 'sub'}: cannot create the directory (Not a directory)")


def test_sft_data_path_that_is_a_directory(tmp_path):
    result = launch("sft", f"--workdir={tmp_path / 'run'}", f"--config.data.train.math.path={tmp_path}")
    assert_one_error_line(result, f"data file {tmp_path} is a directory; expected a JSONL file")


def test_empty_grpo_prompt_file(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    result = launch("grpo", f"--workdir={tmp_path / 'run'}", "--config.warm_start.stage=",
                    f"--config.data.train.math.path={empty}")
    assert_one_error_line(result, f"prompt source 'math' ({empty}): no prompts (it holds no records)")


@pytest.mark.parametrize("read, name", [(sources.read_jsonl, "chats.jsonl"), (preference.read_lines, "pairs.jsonl"),
                                        (preference.read_lines, "pairs.jsonl.gz")])
def test_directory_is_named(tmp_path, read, name):
    path = tmp_path / name
    path.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"data file {path} is a directory; expected a JSONL file")):
        list(read(str(path)))


def test_one_empty_prompt_source_among_several_is_named(tmp_path):
    """A silent loss before: the empty source's category vanished from the mix."""
    empty = tmp_path / "code.jsonl"
    empty.write_text("")
    config = {"math": ml_collections.ConfigDict(dict(path="embedded", weight=1.0)),
              "code": ml_collections.ConfigDict(dict(path=str(empty), weight=1.0))}
    with pytest.raises(ValueError, match=re.escape(f"prompt source 'code' ({empty}): no prompts")):
        prompts.load_prompts(config, seed=0, num_embedded=4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [\n')
    config["code"].path = str(bad)
    with pytest.raises(ValueError, match=re.escape("no prompts (all 1 records skipped {'malformed_json': 1})")):
        prompts.load_prompts(config, seed=0, num_embedded=4, skip_bad_records=True)


def test_empty_generate_prompt_file(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no prompts")):
        generate.load_prompts(ml_collections.ConfigDict(dict(prompts=str(empty))))
