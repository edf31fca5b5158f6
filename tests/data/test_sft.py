"""SFT data: formats, bad records, truncation, best-fit-decreasing packing, mixtures, TFDS, resume."""
import json

import ml_collections
import numpy as np
import pytest

from alignment.data import sft as sft_data
from alignment.data.packing import PackedDataset, best_fit_decreasing, pack_row
from alignment.data.sources import load_records, to_messages
from alignment.data.tokenizer import load_tokenizer

import grain

TOKENIZER = load_tokenizer("embedded")


def data_config(**overrides):
    values = dict(max_length=64, truncation="truncate", train_on="all_assistant", skip_bad_records=False,
                  packing=True, pack_buffer=16, num_embedded=50, num_embedded_eval=8)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def source(path, weight=1.0):
    return ml_collections.ConfigDict(dict(path=path, weight=weight, format="auto", tfds_data_dir=""))


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def test_formats_become_chats():
    assert to_messages({"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief"}) == [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]
    assert to_messages({"prompt": "Hi", "completion": "Hello"}) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    conversational = {"prompt": [{"role": "user", "content": "Hi"}],
                      "completion": [{"role": "assistant", "content": "Hello"}]}
    assert to_messages(conversational) == conversational["prompt"] + conversational["completion"]


BAD_LINES = [
    (b'{"messages": [', "malformed JSON", "malformed_json"),
    ({"instruction": "no output field"}, "missing field 'output'", "missing_field"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown role 'wizard'", "unknown_role"),
    (chat("question", "   "), "assistant content is empty", "empty_assistant"),
    (b'{"prompt": "caf\xe9", "completion": "x"}', "not valid UTF-8", "non_utf8"),
]


@pytest.mark.parametrize("line,message,reason", BAD_LINES)
def test_bad_record_names_file_and_line(tmp_path, line, message, reason):
    path = write_lines(tmp_path / "data.jsonl", [chat("a", "b"), line, chat("c", "d")])
    encode = lambda m: sft_data.chat_example(TOKENIZER, "chatml", "all_assistant", m)  # noqa: E731
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        load_records(path, category="x", encode=encode)
    records, stats = load_records(path, category="x", encode=encode, skip_bad_records=True)
    assert len(records) == 2 and stats.read == 3 and dict(stats.skipped) == {reason: 1}


def test_truncation_and_drop_are_counted(tmp_path):
    long_answer = " ".join(["word"] * 200)
    path = write_lines(tmp_path / "data.jsonl", [chat("short", "ok"), chat("long", long_answer)])
    cfg = source(path)
    examples, report = sft_data.load_source("x", cfg, data_config(), TOKENIZER, "chatml", 0, 0)
    assert report.truncated == 1 and report.kept == 2 and max(len(e["inputs"]) for e in examples) == 64
    examples, report = sft_data.load_source("x", cfg, data_config(truncation="drop"), TOKENIZER, "chatml", 0, 0)
    assert report.dropped_too_long == 1 and report.kept == 1
    # A prompt so long that truncation leaves no assistant token: dropped and counted, not trained on.
    path = write_lines(tmp_path / "prompt.jsonl", [chat(long_answer, "ok"), chat("short", "ok")])
    _, report = sft_data.load_source("x", source(path), data_config(), TOKENIZER, "chatml", 0, 0)
    assert report.dropped_no_loss_tokens == 1 and report.kept == 1


def test_best_fit_decreasing_known_answer():
    bins = best_fit_decreasing([5, 3, 7, 2, 6, 4, 1, 8], capacity=10)
    assert sorted(sorted(b) for b in bins) == [[0, 6], [1, 2], [3, 7], [4, 5]]
    assert sorted(i for b in bins for i in b) == list(range(8))


def test_packed_rows_restart_positions_and_keep_every_token():
    rng = np.random.default_rng(0)
    samples = [{"inputs": rng.integers(1, 100, n), "targets": rng.integers(1, 100, n),
                "loss_mask": rng.random(n) < 0.5} for n in rng.integers(3, 30, 40)]
    rows = list(PackedDataset(grain.MapDataset.source(samples).to_iter_dataset(), 16, 32))
    assert sum((r["segment_ids"] > 0).sum() for r in rows) == sum(len(s["inputs"]) for s in samples)
    recovered = []
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            where = row["segment_ids"] == segment
            np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
            recovered.append(tuple(row["inputs"][where]))
    assert sorted(recovered) == sorted(tuple(s["inputs"]) for s in samples)


def test_train_stream_resumes_exactly_and_mixes_by_weight():
    examples = {
        "a": [{"inputs": np.full(n, 1), "targets": np.full(n, 1), "loss_mask": np.ones(n, bool)} for n in range(5, 25)],
        "b": [{"inputs": np.full(n, 2), "targets": np.full(n, 2), "loss_mask": np.ones(n, bool)} for n in range(5, 25)],
    }
    sources = ml_collections.ConfigDict(dict(a=source("x", 3.0), b=source("y", 1.0)))
    stream = sft_data.train_batches(examples, sources, data_config(max_length=40), batch_size=4, seed=0)
    it = iter(stream)
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(stream)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    tokens = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in first + expected])
    samples_a = sum(len(np.unique(b["segment_ids"][b["inputs"] == 1])) for b in first)
    assert samples_a > 0 and np.mean(tokens == 1) > 0.6  # weight 3:1 -> about 75% of samples from 'a'


def test_process_shards_are_disjoint():
    examples = {"a": [{"inputs": np.array([i] * 3), "targets": np.array([i] * 3), "loss_mask": np.ones(3, bool)}
                      for i in range(1, 41)]}
    sources = ml_collections.ConfigDict(dict(a=source("x")))
    cfg = data_config(max_length=3, packing=False)
    seen = []
    for process in range(2):
        it = iter(sft_data.train_batches(examples, sources, cfg, batch_size=4, seed=0, process_index=process,
                                         process_count=2))
        seen.append({int(next(it)["inputs"][r, 0]) for _ in range(5) for r in range(2)})
    assert not seen[0] & seen[1]


def test_eval_batches_keep_every_example():
    examples = [{"inputs": np.arange(1, n + 1), "targets": np.arange(1, n + 1), "loss_mask": np.ones(n, bool)}
                for n in (5, 9, 12)]
    batches = sft_data.eval_batches(examples, data_config(max_length=16, packing=False), batch_size=2)
    assert len(batches) == 2 and sum(int((b["segment_ids"] > 0).sum()) for b in batches) == 26


def test_tfds_source(tmp_path):
    import tensorflow_datasets as tfds

    class TinyInstructions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"instruction": tfds.features.Text(),
                                                   "output": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"instruction": f"What is {i} + 1?", "output": f"The answer is {i + 1}."}

    TinyInstructions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    records, stats = load_records("tfds:tiny_instructions:train", category="math", tfds_data_dir=str(tmp_path))
    assert stats.read == 6
    answers = sorted(r["messages"][1]["content"] for r in records)
    assert answers == [f"The answer is {i + 1}." for i in range(6)]


def test_pack_row_layout():
    row = pack_row([{"inputs": np.array([5, 6]), "targets": np.array([6, 7]), "loss_mask": np.array([0, 1], bool)},
                    {"inputs": np.array([8]), "targets": np.array([9]), "loss_mask": np.array([1], bool)}], 5)
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [False, True, True, False, False])
