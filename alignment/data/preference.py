"""Preference data: pair and unpaired records -> rows that pack two sequences sharing a prompt.

Accepted JSONL records (`.jsonl` or `.jsonl.gz`), one per line:
  pairs:    {"prompt": str | "messages": [...], "chosen": str | [...], "rejected": str | [...],
             "chosen_score"?: num, "rejected_score"?: num, "margin"?: num, "category"?: str}
  HH-RLHF:  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}  (dialogues sharing all but
            the last assistant turn)
  rankings: {"prompt" | "messages", "responses": [best, ..., worst], "scores"?: [...]}  -> all ordered pairs
  unpaired: {"prompt" | "messages", "completion": str | [...], "label": bool}  (KTO; pairs also convert)
A string completion is one assistant turn. Scores are normalised from `score_range` to [0, 1].

A row is [length] with sequence A as segment 1 and sequence B as segment 2, positions restarting at 0, padding
segment 0. Unlike SFT rows, `inputs` hold every token of a sequence (the reward model reads the hidden state
after the last one); `targets` are the next token within the same sequence and `loss_mask` marks completion
targets. With `share_prefix`, B's tokens that repeat A's prompt are left out of the row (B starts at the
position where it leaves A) and `kv_index`, `kv_segment_ids`, `kv_positions` [kv_length] lay out the keys both
sequences attend to (`models.transformer.SharedKV`): the same losses for about a third less compute on
multi-turn dialogues. Bad records raise naming file and line, or are skipped and counted with `skip_bad_records`.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
from typing import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alignment import sharding
from alignment.data.chat import encode_chat
from alignment.data.sources import open_data_file
from alignment.data.synthetic import arithmetic_record
from alignment.data.tokenizer import load_tokenizer
from alignment.models.transformer import SharedKV

EMBEDDED = "embedded"
SEQUENCE_FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")  # [seq] per row; the rest is per pair
KV_FIELDS = ("kv_index", "kv_segment_ids", "kv_positions")  # [kv_seq] per row of share_prefix rows
ROW_FIELDS = SEQUENCE_FIELDS + KV_FIELDS
TRUNCATION = ("truncate", "drop")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Pair:
    """A prompt with a preferred and a dispreferred completion; scores normalised to [0, 1] or None."""

    prompt: list
    chosen: list
    rejected: list
    chosen_score: float | None = None
    rejected_score: float | None = None
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class Example:
    """An unpaired completion labelled desirable or not (KTO)."""

    prompt: list
    completion: list
    desirable: bool


@dataclasses.dataclass
class PreferenceStats:
    """What happened to the records, so nothing is dropped silently."""

    records: int = 0
    skipped_bad: int = 0
    bad_examples: list = dataclasses.field(default_factory=list)  # the first few skip reasons, with file:line
    examples: int = 0  # pairs (or unpaired examples) the kept records expanded to
    kept: int = 0
    truncated: int = 0  # sequences cut to max_length
    shared_tokens: int = 0  # prompt tokens held once instead of twice (share_prefix)
    dropped_too_long: int = 0  # pairs (or examples) with a sequence too long to keep
    scored: int = 0  # kept pairs with both absolute scores
    real_tokens: int = 0
    padded_slots: int = 0

    def bad(self, message: str) -> None:
        self.skipped_bad += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(message)

    def summary(self) -> dict:
        util = self.real_tokens / self.padded_slots if self.padded_slots else 0.0
        return dict(dataclasses.asdict(self), token_utilisation=round(util, 4))


# --- sources -----------------------------------------------------------------------------------------------

def read_lines(path: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, record, error) per non-blank line of a .jsonl or .jsonl.gz file; `where` is 'path:line'."""
    with open_data_file(path, gzip.open if path.endswith(".gz") else open) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"malformed JSON ({e.msg})"
                continue
            if not isinstance(record, dict):
                yield where, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield where, record, None


def embedded_records(num: int, seed: int) -> list[dict]:
    """Arithmetic pairs: the worked solution vs the same steps with a wrong final answer.

    Every other pair carries absolute scores (1-10 scale), so the default data mixes scored and unscored pairs.
    """
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num):
        good = arithmetic_record(rng, max_operand=9, num_ops=1)
        solution = good["messages"][1]["content"]
        answer = int(good["answer"])
        wrong = answer + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
        record = {"messages": good["messages"][:1], "chosen": solution,
                  "rejected": solution[: solution.rindex("The answer is")] + f"The answer is {wrong}.",
                  "category": "math"}
        if i % 2 == 0:
            record.update(chosen_score=9.0 + rng.random(), rejected_score=1.0 + 2 * rng.random())
        records.append(record)
    return records


def load_records(source: str, *, seed: int, num_embedded: int) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, record, error) from 'embedded' or a JSONL file."""
    if source == EMBEDDED:
        return ((f"embedded:{i + 1}", r, None) for i, r in enumerate(embedded_records(num_embedded, seed)))
    return read_lines(source)


# --- records -> pairs / examples ----------------------------------------------------------------------------

def parse_hh_dialogue(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', 'content': 'a'}, {'role': 'assistant', ...}]."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("HH dialogue must start with '\\n\\nHuman:' (text found before the first turn)")
    if len(parts) < 3:
        raise ValueError("HH dialogue has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return [{"role": _HH_ROLES[name], "content": content.strip()} for name, content in zip(parts[1::2], parts[2::2])]


def _prompt(record: dict) -> list:
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError("'prompt' must be a string (use 'messages' for a conversation)")
        return [{"role": "user", "content": record["prompt"]}]
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise ValueError("'messages' must be a list of {role, content}")
        return record["messages"]
    raise ValueError(f"missing field 'prompt' or 'messages' (keys present: {sorted(record)})")


def _completion(value, field: str) -> list:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value:
        return value
    raise ValueError(f"'{field}' must be a string or a non-empty list of messages")


def _score(value, name: str, score_range: Sequence[float]) -> float | None:
    """An annotated score mapped from score_range to [0, 1]; None stays None (no score)."""
    if value is None:
        return None
    lo, hi = score_range
    if not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"'{name}'={value!r} is not a number in score_range [{lo}, {hi}]")
    return (float(value) - lo) / (hi - lo)


def _hh_pair(record: dict) -> Pair:
    if "\n\nHuman:" not in record["chosen"]:
        raise ValueError("missing field 'prompt' or 'messages' (or HH-RLHF '\\n\\nHuman:' dialogue strings)")
    chosen, rejected = parse_hh_dialogue(record["chosen"]), parse_hh_dialogue(record["rejected"])
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("HH chosen and rejected dialogues differ before their last turn")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("HH chosen and rejected dialogues must end with an Assistant turn")
    return Pair(chosen[:-1], chosen[-1:], rejected[-1:])


def record_to_pairs(record: dict, score_range: Sequence[float] = (0.0, 1.0)) -> list[Pair]:
    """One record -> its pairs (a ranking of n responses gives n(n-1)/2); ValueError says what is wrong."""
    if "responses" in record:
        prompt, responses = _prompt(record), record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise ValueError("'responses' must list at least two completions, best first")
        scores = record.get("scores") or [None] * len(responses)
        if len(scores) != len(responses):
            raise ValueError(f"'scores' has {len(scores)} entries for {len(responses)} responses")
        scores = [_score(s, f"scores[{i}]", score_range) for i, s in enumerate(scores)]
        completions = [_completion(r, f"responses[{i}]") for i, r in enumerate(responses)]
        return [Pair(prompt, completions[i], completions[j], scores[i], scores[j],
                     _margin(record, scores[i], scores[j]))
                for i in range(len(responses)) for j in range(i + 1, len(responses))]
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing field {key!r} (keys present: {sorted(record)})")
    if "prompt" not in record and "messages" not in record and isinstance(record["chosen"], str):
        return [_hh_pair(record)]
    s_c = _score(record.get("chosen_score"), "chosen_score", score_range)
    s_r = _score(record.get("rejected_score"), "rejected_score", score_range)
    return [Pair(_prompt(record), _completion(record["chosen"], "chosen"), _completion(record["rejected"], "rejected"),
                 s_c, s_r, _margin(record, s_c, s_r))]


def _margin(record: dict, s_chosen: float | None, s_rejected: float | None) -> float:
    """An explicit 'margin', else the normalised score gap when both scores exist, else 0."""
    if record.get("margin") is not None:
        return float(record["margin"])
    return s_chosen - s_rejected if s_chosen is not None and s_rejected is not None else 0.0


def record_to_examples(record: dict, score_range: Sequence[float] = (0.0, 1.0)) -> list[Example]:
    """An unpaired record -> one Example; a pair record -> its chosen (desirable) and rejected (undesirable)."""
    if "completion" in record:
        if not isinstance(record.get("label"), bool):
            raise ValueError("unpaired record needs a boolean 'label' (true = desirable)")
        return [Example(_prompt(record), _completion(record["completion"], "completion"), record["label"])]
    return [e for p in record_to_pairs(record, score_range) for e in (Example(p.prompt, p.chosen, True),
                                                         Example(p.prompt, p.rejected, False))]


# --- encoding and packing -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Encoder:
    """Tokenizes prompt + completion with the chat template; loss on the completion's assistant tokens."""

    tokenizer: object
    template: str
    max_length: int  # tokens per sequence; a row holds two
    truncation: str = "truncate"
    share_prefix: bool = False  # hold the tokens the two sequences of a row share once (see the module docstring)

    def __post_init__(self):
        if self.truncation not in TRUNCATION:
            raise ValueError(f"data.truncation must be one of {TRUNCATION}, got {self.truncation!r}")

    def sequence(self, prompt: list, completion: list, stats: PreferenceStats) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, completion mask) [n], truncated to max_length (keeping the start, counted), or None when it
        is too long and truncation is 'drop' or would leave no completion token."""
        encoded = encode_chat(self.tokenizer, list(prompt) + list(completion), self.template)
        ids, mask = encoded.ids, encoded.loss_mask.copy()
        # Only completion tokens are in the loss, even when the prompt holds earlier assistant turns.
        prompt_ids = encode_chat(self.tokenizer, list(prompt), self.template, add_generation_prompt=True).ids
        mask[: len(prompt_ids)] = False
        if len(ids) > self.max_length:
            if self.truncation == "drop" or not mask[: self.max_length].any():
                return None
            stats.truncated += 1
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        return ids, mask


def shared_prefix_length(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """How many leading tokens of b a row can take from a: their common prefix, ending before the first token
    with a loss target in either (its next token differs between them, or counts once for each) and leaving
    each sequence at least its last token (the reward model reads it)."""
    (ids_a, mask_a), (ids_b, mask_b) = a, b
    n = max(min(len(ids_a), len(ids_b)) - 1, 0)
    same = (ids_a[:n] == ids_b[:n]) & ~mask_a[1:n + 1] & ~mask_b[1:n + 1]
    return int(np.argmin(same)) if not same.all() else n


def pack_two(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], length: int,
             share_prefix: bool = False) -> dict[str, np.ndarray]:
    """Sequences a and b -> one row [length]: segments 1 and 2, positions restarting, next-token targets
    within each sequence and the completion mask on targets. With share_prefix, b's tokens shared with a
    (`shared_prefix_length`) are left out and the row gets the KV_FIELDS [length] that attend b to them."""
    row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    row["loss_mask"] = np.zeros(length, np.bool_)
    shared = shared_prefix_length(a, b) if share_prefix else 0
    start = 0
    for segment, (ids, mask), first in ((1, a, 0), (2, b, shared)):
        end = start + len(ids) - first
        row["inputs"][start:end] = ids[first:]
        row["targets"][start:end - 1] = ids[first + 1:]
        row["loss_mask"][start:end - 1] = mask[first + 1:]
        row["positions"][start:end] = np.arange(first, len(ids))
        row["segment_ids"][start:end] = segment
        start = end
    if share_prefix:  # keys: all of a, then b's shared prefix read from a's slots and the rest from b's
        n_a, n_b = len(a[0]), len(b[0])
        row["kv_index"] = np.zeros(length, np.int32)
        row["kv_index"][:n_a + n_b] = np.concatenate([np.arange(n_a), np.arange(shared),
                                                      np.arange(n_a, n_a + n_b - shared)])
        row["kv_segment_ids"] = np.zeros(length, np.int32)
        row["kv_segment_ids"][:n_a + n_b] = np.repeat([1, 2], [n_a, n_b])
        row["kv_positions"] = np.zeros(length, np.int32)
        row["kv_positions"][:n_a + n_b] = np.concatenate([np.arange(n_a), np.arange(n_b)])
    return row


def _records(source: str, *, seed: int, num_embedded: int, skip_bad_records: bool, stats: PreferenceStats,
             convert) -> Iterator[tuple[str, object]]:
    """(where, item) for every item `convert(record)` yields; bad records raise or are skipped and counted."""
    for where, record, error in load_records(source, seed=seed, num_embedded=num_embedded):
        stats.records += 1
        try:
            if error is not None:
                raise ValueError(error)
            items = convert(record)
        except (ValueError, KeyError, TypeError) as e:
            if not skip_bad_records:
                raise ValueError(f"{where}: {e}") from None
            stats.bad(f"{where}: {e}")
            continue
        for item in items:
            yield where, item


def _encode_two(encoder: Encoder, prompt, first, second, where: str, stats: PreferenceStats,
                skip_bad_records: bool) -> dict | None:
    """One row holding prompt + `first` (segment 1) and prompt + `second` (segment 2); None when the record
    is skipped as bad or dropped as too long (both counted in `stats`)."""
    try:
        a = encoder.sequence(prompt, first, stats)
        b = encoder.sequence(prompt, second, stats)
    except (ValueError, KeyError, TypeError) as e:
        if not skip_bad_records:
            raise ValueError(f"{where}: {e}") from None
        stats.bad(f"{where}: {e}")
        return None
    if a is None or b is None:
        stats.dropped_too_long += 1
        return None
    row = pack_two(a, b, 2 * encoder.max_length, encoder.share_prefix)
    stats.shared_tokens += len(a[0]) + len(b[0]) - int((row["segment_ids"] > 0).sum())
    return row


def encode_pairs(source: str, encoder: Encoder, *, seed: int = 0, num_embedded: int = 0,
                 skip_bad_records: bool = False, score_range: Sequence[float] = (0.0, 1.0)
                 ) -> tuple[list[dict], PreferenceStats]:
    """Pair rows: chosen = segment 1, rejected = segment 2, plus chosen_score, rejected_score, has_score, margin."""
    stats, rows = PreferenceStats(), []
    convert = lambda r: record_to_pairs(r, score_range)  # noqa: E731
    for where, pair in _records(source, seed=seed, num_embedded=num_embedded, skip_bad_records=skip_bad_records,
                                stats=stats, convert=convert):
        stats.examples += 1
        row = _encode_two(encoder, pair.prompt, pair.chosen, pair.rejected, where, stats, skip_bad_records)
        if row is None:
            continue
        has_score = pair.chosen_score is not None and pair.rejected_score is not None
        row.update(chosen_score=np.float32(pair.chosen_score or 0.0), rejected_score=np.float32(pair.rejected_score or 0.0),
                   has_score=np.float32(has_score), margin=np.float32(pair.margin))
        rows.append(row)
        stats.kept += 1
        stats.scored += has_score
        stats.real_tokens += int((row["segment_ids"] > 0).sum())
        stats.padded_slots += 2 * encoder.max_length
    if not rows:
        raise ValueError(f"{source}: no usable preference pairs ({stats.summary()})")
    return rows, stats


def encode_unpaired(source: str, encoder: Encoder, *, seed: int = 0, num_embedded: int = 0,
                    skip_bad_records: bool = False, score_range: Sequence[float] = (0.0, 1.0)
                    ) -> tuple[list[dict], PreferenceStats]:
    """KTO rows: the example as segment 1 and, as segment 2, its prompt with the next example's completion
    (the mismatched pair the KL reference point is estimated from); plus `desirable`."""
    stats, examples = PreferenceStats(), []
    convert = lambda r: record_to_examples(r, score_range)  # noqa: E731
    for where, example in _records(source, seed=seed, num_embedded=num_embedded,
                                   skip_bad_records=skip_bad_records, stats=stats, convert=convert):
        stats.examples += 1
        examples.append((where, example))
    rows = []
    for i, (where, example) in enumerate(examples):
        other = examples[(i + 1) % len(examples)][1]
        row = _encode_two(encoder, example.prompt, example.completion, other.completion, where, stats,
                          skip_bad_records)
        if row is None:
            continue
        row["desirable"] = np.bool_(example.desirable)
        rows.append(row)
        stats.kept += 1
        stats.real_tokens += int((row["segment_ids"] > 0).sum())
        stats.padded_slots += 2 * encoder.max_length
    if not rows:
        raise ValueError(f"{source}: no usable examples ({stats.summary()})")
    return rows, stats


def pack_pairs(batch: dict[str, np.ndarray], pairs_per_row: int) -> dict[str, np.ndarray]:
    """P pair rows [P, L] -> R = P / k rows [R, k * L] holding k pairs each, back to back; per-pair fields stay [P].

    Row r packs pairs r, r + R, ..., r + (k - 1) R (strided, like `train.step.split_micro_batches`, so every
    micro-batch of rows holds exactly its micro-batch of pairs); pair j of a row has segments 2j + 1 (chosen or
    the example) and 2j + 2. `pair_columns` maps per-segment results back to pair order. Rows then carry
    ~k times less padding, and the attention of `xla_flash` skips the tiles between pairs.
    """
    pairs = batch["segment_ids"].shape[0]
    if pairs_per_row == 1:
        return batch
    if pairs_per_row < 1 or pairs % pairs_per_row:
        raise ValueError(f"data.pairs_per_row={pairs_per_row} must be >= 1 and divide the {pairs} pairs of a batch")
    rows = pairs // pairs_per_row
    out = {k: (np.zeros((rows, pairs_per_row * v.shape[1]), v.dtype) if k in ROW_FIELDS else v)
           for k, v in batch.items()}
    for r in range(rows):
        start = kv_start = 0
        for j in range(pairs_per_row):
            pair = r + j * rows
            n = int((batch["segment_ids"][pair] > 0).sum())  # each pair row is real tokens first, then padding
            for key in SEQUENCE_FIELDS:
                out[key][r, start:start + n] = batch[key][pair, :n]
            out["segment_ids"][r, start:start + n] += 2 * j
            if "kv_index" in batch:  # the pair's key slots point at its tokens, which now start at `start`
                m = int((batch["kv_segment_ids"][pair] > 0).sum())
                for key in KV_FIELDS:
                    out[key][r, kv_start:kv_start + m] = batch[key][pair, :m]
                out["kv_segment_ids"][r, kv_start:kv_start + m] += 2 * j
                out["kv_index"][r, kv_start:kv_start + m] += start
                kv_start += m
            start += n
    return out


def pair_columns(per_segment, pairs_per_row: int):
    """[R, 2k] per-segment values of `pack_pairs` rows -> [R * k, 2] (chosen, rejected) in the batch's pair order."""
    rows = per_segment.shape[0]
    return per_segment.reshape(rows, pairs_per_row, 2).transpose(1, 0, 2).reshape(rows * pairs_per_row, 2)


def pairs_per_row(batch: dict) -> int:
    """k of a `pack_pairs` batch (static): its pairs (the length of any per-pair field) over its rows."""
    per_pair = next((v for k, v in batch.items() if k not in ROW_FIELDS), None)
    return 1 if per_pair is None else per_pair.shape[0] // batch["segment_ids"].shape[0]


def compact(batch: dict[str, np.ndarray], pairs_per_row: int, trim_multiple: int) -> dict[str, np.ndarray]:
    """`pack_pairs`, then `trim`: the rows a train or eval step runs on."""
    return trim(pack_pairs(batch, pairs_per_row), trim_multiple)


def trim(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Cut the padding columns every row of `batch` shares, keeping a multiple of `multiple` columns, so a
    batch of short pairs costs less while the number of compiled shapes stays small. 0 keeps the full length."""
    if multiple <= 0:
        return batch
    out = dict(batch)
    for fields, segments in ((SEQUENCE_FIELDS, "segment_ids"), (KV_FIELDS, "kv_segment_ids")):
        if segments in batch:
            length = batch[segments].shape[1]
            used = int(np.max(np.nonzero(batch[segments].any(axis=0))[0], initial=0)) + 1
            keep = min(length, -(-used // multiple) * multiple)
            out.update({k: batch[k][:, :keep] for k in fields if k in batch})
    return out


def split_held_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded random `fraction` of the rows (at least one) is held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.eval_fraction must be in (0, 1) when data.eval='', got {fraction}")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, int(round(fraction * len(rows))))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> one batch: each field stacked along a new leading axis."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def shuffled_batches(rows: list[dict], batch_size: int, seed: int) -> grain.MapDataset:
    """Endless reshuffled epochs of [batch_size, ...] batches; its iterator state is checkpointable."""
    return grain.MapDataset.source(rows).seed(seed).shuffle().repeat(None).batch(batch_size, drop_remainder=True,
                                                                                 batch_fn=stack)


def fixed_batches(rows: list[dict], batch_size: int) -> list[dict]:
    """All rows in order as stacked batches; the last is padded with copies of the first rows, so callers
    keep the first len(rows) outputs."""
    padded = rows + [rows[i % len(rows)] for i in range(-len(rows) % batch_size)]
    return [stack(padded[i:i + batch_size]) for i in range(0, len(padded), batch_size)]


def prepare_data(config: ml_collections.ConfigDict, vocab_size: int, unpaired: bool = False):
    """(train rows, held-out rows, data summary) for the rm and dpo stages."""
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {vocab_size}")
    d = config.data
    rows, rest = divmod(config.batch_size, d.pairs_per_row) if d.pairs_per_row >= 1 else (0, 1)
    if rest or rows % config.micro_batches:
        raise ValueError(f"data.pairs_per_row={d.pairs_per_row} must divide batch_size={config.batch_size} into a "
                         f"number of rows that micro_batches={config.micro_batches} divides")
    encoder = Encoder(tokenizer, config.chat_template, d.max_length, d.truncation, d.share_prefix)
    encode = functools.partial(encode_unpaired if unpaired else encode_pairs, encoder=encoder,
                               skip_bad_records=d.skip_bad_records, score_range=tuple(d.score_range))
    train, stats = encode(d.train, seed=config.seed, num_embedded=d.num_embedded)
    if d.eval:
        held_out, eval_stats = encode(d.eval, seed=config.seed + 1, num_embedded=d.num_embedded_eval)
    else:
        (train, held_out), eval_stats = split_held_out(train, d.eval_fraction, config.seed), None
    summary = {"train": stats.summary(), "eval": eval_stats.summary() if eval_stats else "split from train",
               "train_rows": len(train), "eval_rows": len(held_out)}
    return train, held_out, summary


def check_rows_split(config: ml_collections.ConfigDict, target: NamedSharding) -> None:
    """The rows of a micro-batch (batch_size / data.pairs_per_row / micro_batches) must split over the batch axes."""
    if config.data.pairs_per_row > 1 and jax.process_count() > 1:
        # Each process packs its own pairs, so the global rows would not follow `pair_columns`' pair order.
        raise ValueError(f"data.pairs_per_row={config.data.pairs_per_row} runs on one process only; this run has "
                         f"{jax.process_count()} processes: set data.pairs_per_row=1")
    rows = config.batch_size // config.data.pairs_per_row // config.micro_batches
    sharding.check_divisible((rows,), PartitionSpec(target.spec[0]), target.mesh,
                             "rows per micro-batch (batch_size / data.pairs_per_row / micro_batches)")


def leaf_shardings(row: dict, target: NamedSharding) -> dict:
    """Shardings of batches stacked from rows like `row`: [batch, seq] fields take `target`, the rest
    (per-pair scalars, ref_logps [pairs, 2]) only its batch axes."""
    return {k: target if k in ROW_FIELDS else NamedSharding(target.mesh, PartitionSpec(target.spec[0]))
            for k in row}


def model_inputs(batch: dict) -> tuple:
    """(tokens, positions, segment_ids, kv) of pair rows, the arguments of `Transformer.__call__`."""
    kv = SharedKV(*(batch[k] for k in KV_FIELDS)) if "kv_index" in batch else None
    return batch["inputs"], batch["positions"], batch["segment_ids"], kv


def place(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """Host rows of this process -> global arrays laid out by `leaf_shardings`."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
