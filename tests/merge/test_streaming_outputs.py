"""Merge outputs: an existing output is a clear error unless overwrite; a merge killed with SIGKILL leaves its
hidden working directory beside the output, which the next merge into the same place removes and reports
(restoring a previous output the killed merge had moved aside). JAX-free: HF in, HF out."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy

from alignment.merge import checkpoint_io, merge_checkpoints
from alignment.models import hf
from alignment.models.config import from_hf_config
from tests import REPO

CONFIG = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False}


def write_model(path, seed) -> str:
    """A random tiny HF Llama checkpoint at `path`."""
    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(t.hf_shape).astype(np.float32)
               for name, _, _, t in hf.hf_entries(from_hf_config(CONFIG))}
    os.makedirs(path)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    return str(path)


@pytest.fixture
def models(tmp_path):
    return [write_model(tmp_path / f"m{i}", i) for i in range(2)]


def tensors(path):
    return safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))


def hidden(parent, name="out"):
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))


def run_child(code: str, cwd) -> subprocess.CompletedProcess:
    """`code` in a fresh Python (the project importable), which is expected to kill itself."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_existing_output_is_a_clear_error_unless_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"output .*/out exists: pass overwrite=True \(--config.merge.overwrite"):
        merge_checkpoints(models, "linear", hf_output=str(out))
    assert (out / "keep.txt").exists() and hidden(tmp_path) == []
    merge_checkpoints(models, "linear", hf_output=str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and "lm_head.weight" in tensors(out) and hidden(tmp_path) == []


def test_a_killed_merges_work_is_removed_by_the_next_merge(models, tmp_path, caplog):
    killed = run_child(f"""
        import os, signal
        from alignment.merge import merge_checkpoints, streaming
        real, calls = streaming.merge_pieces, []
        def die_on_fifth(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        streaming.merge_pieces = die_on_fifth
        merge_checkpoints({models!r}, "linear", hf_output="out", workers=1)
        """, tmp_path)
    assert killed.returncode == -9, killed.stderr
    (left,) = hidden(tmp_path)
    assert left.startswith(".out.merge-tmp-") and not (tmp_path / "out").exists()
    assert os.path.getsize(tmp_path / left / "output" / "model.safetensors") > 0  # a partial output, forever so far
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(models, "linear", hf_output=str(tmp_path / "out"))
    assert hidden(tmp_path) == []
    assert f"removed {tmp_path / left}" in caplog.text and "killed (pid" in caplog.text
    merge_checkpoints(models, "linear", hf_output=str(tmp_path / "fresh"))
    for name, value in tensors(tmp_path / "fresh").items():
        np.testing.assert_array_equal(tensors(tmp_path / "out")[name], value)


def test_a_merge_killed_while_replacing_its_output_leaves_the_old_one_restorable(models, tmp_path, caplog):
    """Killed after moving the old output aside and before moving the new one in: the next merge puts the old
    one back (and, without overwrite, then refuses to replace it)."""
    merge_checkpoints(models[:1], "linear", hf_output=str(tmp_path / "out"))
    before = tensors(tmp_path / "out")
    killed = run_child(f"""
        import os, signal
        from alignment.merge import merge_checkpoints
        real = os.rename
        def rename(src, dst):
            if src.endswith("/output"):  # the new output, about to take the old one's place
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.rename = rename
        merge_checkpoints({models!r}, "linear", hf_output="out", overwrite=True)
        """, tmp_path)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out").exists() and len(hidden(tmp_path)) == 1
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="exists: pass overwrite=True"):
        merge_checkpoints(models, "linear", hf_output=str(tmp_path / "out"))
    assert "restored" in caplog.text and hidden(tmp_path) == []
    for name, value in before.items():
        np.testing.assert_array_equal(tensors(tmp_path / "out")[name], value)


def test_a_running_merges_work_is_left_alone(tmp_path):
    path = str(tmp_path / "out")
    with checkpoint_io.atomic_output(path, overwrite=False) as directory:
        assert checkpoint_io.remove_stale_work(path) == []  # its lock is held: a merge in progress
        assert os.path.isdir(directory) and hidden(tmp_path)[0].startswith(".out.merge-tmp-")
    assert os.path.isdir(path) and hidden(tmp_path) == []


def test_work_of_an_earlier_version_is_named_not_deleted(models, tmp_path, caplog):
    (tmp_path / ".out.tmp-abc123").mkdir()
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(models, "linear", hf_output=str(tmp_path / "out"))
    assert ".out.tmp-abc123" in caplog.text and "earlier version" in caplog.text
    assert (tmp_path / ".out.tmp-abc123").is_dir()
