"""Preference records: forms, packing layout, truncation and bad-record handling."""
import gzip
import json

import numpy as np
import pytest

from alignment.data import preference
from alignment.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def encoder():
    return preference.Encoder(load_tokenizer("embedded"), "chatml", max_length=48)


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return str(path)


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5.", "chosen_score": 9, "rejected_score": 3}


def test_record_forms():
    pair = preference.record_to_pairs(GOOD, score_range=(1, 10))[0]
    assert pair.prompt == [{"role": "user", "content": "What is 2 + 2?"}]
    assert pair.chosen_score == pytest.approx(8 / 9) and pair.rejected_score == pytest.approx(2 / 9)
    assert pair.margin == pytest.approx(6 / 9)

    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away"}
    pair = preference.record_to_pairs(hh)[0]
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.chosen == [{"role": "assistant", "content": "see you"}] and pair.chosen_score is None

    ranking = {"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.9, 0.5, 0.1]}
    pairs = preference.record_to_pairs(ranking)
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]

    examples = preference.record_to_examples({"prompt": "q", "completion": "a", "label": False})
    assert examples[0].desirable is False
    assert [e.desirable for e in preference.record_to_examples(GOOD, (1, 10))] == [True, False]


def test_pack_two_layout(encoder):
    stats = preference.PreferenceStats()
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    a = encoder.sequence(prompt, [{"role": "assistant", "content": "4."}], stats)
    b = encoder.sequence(prompt, [{"role": "assistant", "content": "It is 5."}], stats)
    row = preference.pack_two(a, b, 96)
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_array_equal(row["segment_ids"][:na + nb], [1] * na + [2] * nb)
    assert not row["segment_ids"][na + nb:].any()
    np.testing.assert_array_equal(row["positions"][na:na + nb], np.arange(nb))
    np.testing.assert_array_equal(row["inputs"][:na], a[0])
    np.testing.assert_array_equal(row["targets"][:na - 1], a[0][1:])
    assert row["targets"][na - 1] == 0 and not row["loss_mask"][na - 1]  # no target across the boundary
    # The loss covers only the completion: the prompt's tokens (and its generation header) are never in it.
    prompt_len = len(preference.encode_chat(encoder.tokenizer, prompt, "chatml", add_generation_prompt=True).ids)
    assert not row["loss_mask"][:prompt_len - 1].any() and row["loss_mask"][prompt_len - 1]
    decoded = encoder.tokenizer.decode(row["targets"][:na][row["loss_mask"][:na]])
    assert decoded.startswith("4.") and "<|im_end|>" in decoded


def unshared_view(row, segment):
    """(tokens, positions) that segment `segment` of a share_prefix row attends to, read through its key slots."""
    slots = row["kv_segment_ids"] == segment
    return row["inputs"][row["kv_index"][slots]], row["kv_positions"][slots]


def test_shared_prefix_row_holds_the_prompt_once(encoder):
    stats = preference.PreferenceStats()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    a = encoder.sequence(prompt, [{"role": "assistant", "content": "4."}], stats)
    b = encoder.sequence(prompt, [{"role": "assistant", "content": "It is 5."}], stats)
    prompt_len = len(preference.encode_chat(encoder.tokenizer, prompt, "chatml", add_generation_prompt=True).ids)
    shared = preference.shared_prefix_length(a, b)
    assert shared == prompt_len - 1  # the last prompt token predicts a different first completion token in each
    row, plain = preference.pack_two(a, b, 96, share_prefix=True), preference.pack_two(a, b, 96)
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_array_equal(row["segment_ids"][:na + nb - shared], [1] * na + [2] * (nb - shared))
    np.testing.assert_array_equal(row["positions"][na:na + nb - shared], np.arange(shared, nb))
    for segment, (ids, _) in ((1, a), (2, b)):  # each sequence still attends to all of its own tokens
        tokens, positions = unshared_view(row, segment)
        np.testing.assert_array_equal(tokens, ids)
        np.testing.assert_array_equal(positions, np.arange(len(ids)))
    # The same targets are in the loss, with the same next tokens.
    np.testing.assert_array_equal(row["targets"][row["loss_mask"]], plain["targets"][plain["loss_mask"]])
    # Packed several to a row, each pair's key slots point at its own tokens.
    batch = preference.stack([row, preference.pack_two(b, a, 96, share_prefix=True)])
    packed = preference.pack_pairs(batch, 2)
    for segment, (ids, _) in enumerate((a, b, b, a), start=1):
        np.testing.assert_array_equal(unshared_view({k: v[0] for k, v in packed.items()}, segment)[0], ids)
    # Identical sequences share up to their first loss target; without targets, up to their last token, which
    # each keeps (the reward model reads it); unrelated sequences share nothing.
    assert preference.shared_prefix_length(a, a) == shared
    no_targets = (a[0], np.zeros(na, bool))
    assert preference.shared_prefix_length(no_targets, no_targets) == na - 1
    assert preference.shared_prefix_length(a, (a[0][::-1].copy(), a[1][::-1].copy())) == 0


def test_truncation_and_drop_are_counted(encoder, tmp_path):
    long = dict(GOOD, chosen="one two three " * 40)
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, long])
    rows, stats = preference.encode_pairs(path, encoder, score_range=(1, 10))
    assert stats.truncated == 1 and stats.kept == 2 and rows[1]["segment_ids"].tolist().count(1) == 48
    dropper = preference.Encoder(encoder.tokenizer, "chatml", 48, truncation="drop")
    rows, stats = preference.encode_pairs(path, dropper, score_range=(1, 10))
    assert stats.dropped_too_long == 1 and stats.kept == 1 and len(rows) == 1


BAD_LINES = [
    (b'{"prompt": "q", "chosen": "a"', "malformed JSON"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"messages": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role 'wizard'"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "assistant content is empty"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not valid UTF-8"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 99, "rejected_score": 1}, "score_range"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: b"}, "differ before"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_record_names_file_and_line(encoder, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        preference.encode_pairs(path, encoder, score_range=(1, 10))


def test_skip_bad_records_counts_them(encoder, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD] + [line for line, _ in BAD_LINES] + [GOOD])
    rows, stats = preference.encode_pairs(path, encoder, skip_bad_records=True, score_range=(1, 10))
    assert len(rows) == 2 and stats.skipped_bad == len(BAD_LINES) and stats.records == len(BAD_LINES) + 2
    assert stats.bad_examples[0].startswith(f"{path}:2: ")
    assert stats.summary()["skipped_bad"] == len(BAD_LINES)


def test_mixed_scores_and_gzip(encoder, tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for record in (GOOD, dict(GOOD, chosen_score=None, rejected_score=None)):
            f.write(json.dumps(record) + "\n")
    rows, stats = preference.encode_pairs(str(path), encoder, score_range=(1, 10))
    assert [float(r["has_score"]) for r in rows] == [1.0, 0.0] and stats.scored == 1


def test_unpaired_rows_carry_a_mismatched_kl_completion(encoder, tmp_path):
    records = [{"prompt": f"q{i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(3)]
    rows, stats = preference.encode_unpaired(write_jsonl(tmp_path / "u.jsonl", records), encoder)
    assert [bool(r["desirable"]) for r in rows] == [True, False, True]
    tok = encoder.tokenizer
    seg2 = tok.decode(rows[0]["inputs"][rows[0]["segment_ids"] == 2])
    assert "q0" in seg2 and "answer 1" in seg2


def test_trim_keeps_a_multiple_of_the_used_columns():
    batch = {"segment_ids": np.zeros((2, 64), np.int32), "inputs": np.ones((2, 64)), "has_score": np.ones(2)}
    batch["segment_ids"][1, :37] = 1
    out = preference.trim(batch, 16)
    assert out["inputs"].shape == (2, 48) and out["has_score"].shape == (2,)
    # Shared-prefix rows: the key-slot fields are trimmed by their own segment ids.
    batch.update(kv_segment_ids=np.zeros((2, 64), np.int32), kv_index=np.zeros((2, 64), np.int32))
    batch["kv_segment_ids"][0, :50] = 1
    out = preference.trim(batch, 16)
    assert out["inputs"].shape == (2, 48) and out["kv_index"].shape == out["kv_segment_ids"].shape == (2, 64)


def test_hh_rlhf_file_with_skip(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    enc = preference.Encoder(load_tokenizer("embedded"), "chatml", max_length=256)
    with pytest.raises(ValueError, match="test.jsonl.gz:"):
        preference.encode_pairs(str(path), enc)
    rows, stats = preference.encode_pairs(str(path), enc, skip_bad_records=True)
    assert stats.skipped_bad > 0 and stats.kept == len(rows) > 1000
    assert stats.kept + stats.dropped_too_long + stats.skipped_bad == stats.records  # every record accounted for
