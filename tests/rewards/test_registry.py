"""Rewards: each reward on hand-made samples, the weighted sum, the on_error policies and config errors."""
import logging
import math

import ml_collections
import numpy as np
import pytest

from alignment.data import synthetic
from alignment.rewards import registry
from alignment.rewards.registry import REWARDS, RewardFunction, Sample

FAST = {"cpu_seconds": 1, "wall_seconds": 2, "memory_bytes": 256 << 20}


def _sample(completion, prompt_id="p0", **record):
    return Sample(prompt_id=prompt_id, prompt=[{"role": "user", "content": "Q?"}], completion=completion,
                  record=record)


# --- math -----------------------------------------------------------------------------------------------------

def test_math_embedded_arithmetic_format():
    for record in synthetic.arithmetic_dataset(3, seed=0):
        solution = record["messages"][-1]["content"]
        assert REWARDS["math"](_sample(solution, answer=record["answer"]), {}) == 1.0
    assert REWARDS["math"](_sample("40 + 2 = 42. The answer is 42.", answer="42"), {}) == 1.0
    assert REWARDS["math"](_sample("40 + 1 = 41. The answer is 41.", answer="42"), {}) == 0.0


@pytest.mark.parametrize("completion, reference, expected", [
    (r"So the result is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),  # numeric reference, LaTeX answer
    ("The answer is 0.5.", r"\frac{1}{2}", 1.0),  # LaTeX reference, decimal answer
    ("The answer is 0.25.", r"\frac{1}{2}", 0.0),
    ("The answer is 1,000.", "She pays 10 * 100 = 1000.\n#### 1000", 1.0),  # a whole GSM8K solution
])
def test_math_symbolic_and_gsm8k(completion, reference, expected):
    assert REWARDS["math"](_sample(completion, answer=reference), {}) == expected


# --- format and length ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("12 + 7 = 19. 19 - 5 = 14. The answer is 14.", 1.0),
    ("The answer is -3.  \n", 1.0),  # surrounding whitespace is ignored
    ("The answer is 14. Let me know if you need more.", 0.0),  # must end with the answer
    ("The answer is fourteen.", 0.0),
])
def test_format_answer_suffix(completion, expected):
    assert REWARDS["format"](_sample(completion), {"rule": "answer_suffix"}) == expected


def test_format_regex_spans_lines():
    params = {"regex": r"<think>.+</think>\s*<answer>.+</answer>"}
    assert REWARDS["format"](_sample("<think>a\nb</think>\n<answer>3</answer>"), params) == 1.0
    assert REWARDS["format"](_sample("<answer>3</answer>"), params) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("x" * 8, 0.0),  # inside [5, 10]
    ("x" * 5, 0.0), ("x" * 10, 0.0),  # the bounds are inside
    ("x" * 12, -0.5),  # 2 over max, ramp 4
    ("x" * 3, -0.5),  # 2 under min
    ("x" * 20, -1.0),  # the penalty saturates at -1
])
def test_length_chars(text, expected):
    assert REWARDS["length"](_sample(text), {"min": 5, "max": 10, "ramp": 4}) == expected


def test_length_flat_penalty_and_tokens():
    assert REWARDS["length"](_sample("x" * 11), {"max": 10}) == -1.0
    from alignment.data.tokenizer import load_tokenizer

    text = "The answer is 42."
    tokens = len(load_tokenizer("embedded").encode(text))
    params = {"max": 0, "ramp": 100, "unit": "tokens", "tokenizer": "embedded"}
    assert REWARDS["length"](_sample(text), params) == pytest.approx(-tokens / 100)


# --- instruction following ------------------------------------------------------------------------------------

IFEVAL = dict(instruction_id_list=["punctuation:no_comma", "startend:end_checker"],
              kwargs=[{}, {"end_phrase": "Any other questions?", "num_words": None}])  # None: HF padding


@pytest.mark.parametrize("completion, params, expected", [
    ("Sure thing.\nAny other questions?", {}, 1.0),
    ("Sure, thing.\nAny other questions?", {}, 0.5),  # the comma breaks one of two
    ("Sure, thing.\nAny other questions?", {"aggregate": "all"}, 0.0),
    ("Sure thing.\nAny other questions?\nBye", {}, 0.5),  # strict: does not end with the phrase
    ("Sure thing.\nAny other questions?\nBye", {"loose": True}, 1.0),  # loose drops the last line
])
def test_ifeval(completion, params, expected):
    assert REWARDS["ifeval"](_sample(completion, **IFEVAL), params) == expected


# --- code -----------------------------------------------------------------------------------------------------

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]
SLOW_ADD = "import time\ndef add(a, b):\n    if a == 0:\n        time.sleep(60)\n    return a + b"


@pytest.mark.parametrize("completion, tests, expected", [
    ("Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", ADD_TESTS, 2 / 3),
    ("def add(a, b):\n    return a + b", "assert add(1, 2) == 3", 1.0),  # one test program
    ("def add(a, b):\n    return a + b", "assert add(1, 2) == 3\nassert add(0, 0) == 1", 0.0),  # all or nothing
    ("def add(a, b):\n    return a - b", ADD_TESTS, 0.0),
    # The main block does not run, so reading stdin there cannot break it.
    ("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    input()", ADD_TESTS[:2], 1.0),
    ("def add(a, b):\n    return a +", ADD_TESTS, 0.0),  # syntax error
    ("import os\nos.abort()", ADD_TESTS, 0.0),  # crash
    ("while True:\n    pass", ADD_TESTS, 0.0),  # CPU hang
    (SLOW_ADD, ADD_TESTS, 0.0),  # idle hang in the third test: the run is cut, nothing counts
    # Stdin tests run the solution as a program and compare what it printed.
    ("print(sum(map(int, input().split())))", [{"stdin": "1 2\n", "stdout": "3\n"},
                                               {"stdin": "2 2", "stdout": "5"}], 0.5),
    # Neither an early clean exit nor a printed imitation of a result is credited.
    ("import os\nos._exit(0)", ADD_TESTS, 0.0),
    ("import os\nprint('[0, \"value\", 3]', flush=True)\nos._exit(0)", ADD_TESTS, 0.0),
])
def test_code(completion, tests, expected):
    assert REWARDS["code"](_sample(completion, tests=tests), FAST) == pytest.approx(expected)


def test_code_score_is_counted_by_the_caller():
    """A program that writes forged result lines on the results channel, or exits from an atexit hook after
    adding its own, gains nothing: values are compared here and repeated records void the run."""
    forge = ("import os\nos.write(3, b'[0, \"value\", 1000]\\n[1, \"value\", true]\\n')\nos._exit(0)")
    atexit = ("import atexit, os\ndef add(a, b):\n    return a + b\n"
              "atexit.register(lambda: os.write(3, b'[2, \"value\", 1]\\n'))")
    for completion in (forge, atexit):
        assert REWARDS["code"](_sample(completion, tests=ADD_TESTS), FAST) == 0.0


@pytest.mark.parametrize("tests, message", [
    ([], "'tests' must be a test program or a non-empty list"),
    (["import time\ntime.sleep(60)"], "test 1: line 2: cannot split `time.sleep(60)`"),
    (["assert add(1, 2) == add(2, 1)"], "neither side is a constant"),
    (["assert all(add(i, i) == 2 * i for i in range(3))"], "is not a call of a function of the solution"),
    (["def f(:"], "test 1: the test does not parse"),
    ([{"stdin": "1"}], "test 1: a test is an assert program or"),
])
def test_code_tests_that_cannot_be_split_name_the_prompt(tests, message):
    result = RewardFunction({"code": {"weight": 1.0, **FAST}})([_sample("def add(a, b): return a + b", "q-3",
                                                                       tests=tests)])
    assert result.errors and "prompt 'q-3'" in result.errors[0]["error"] and message in result.errors[0]["error"]


# --- reward model ---------------------------------------------------------------------------------------------

def test_reward_model_batches_and_caches(monkeypatch):
    from alignment.rewards import reward_model as rm

    loads, calls = [], []

    def fake_load(checkpoint):
        loads.append(checkpoint)
        return lambda chats: calls.append(chats) or np.array([len(c[-1]["content"]) for c in chats], float)

    monkeypatch.setattr(rm, "load_reward_model", fake_load)
    registry._reward_model.cache_clear()
    reward = RewardFunction({"reward_model": {"weight": 2.0, "checkpoint": "/ckpt"}})
    result = reward([_sample("abc"), _sample("abcde")])
    np.testing.assert_array_equal(result.total, [6.0, 10.0])
    reward([_sample("x")])
    assert loads == ["/ckpt"]  # loaded once per checkpoint
    assert len(calls) == 2  # one call per batch
    assert calls[0][0] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "abc"}]
    registry._reward_model.cache_clear()


def test_failing_batch_is_rescored_one_by_one(monkeypatch):
    def batch(samples, params):
        if any(s.completion == "bad" for s in samples):
            raise RuntimeError("bad sample in batch")
        return np.array([len(s.completion) for s in samples], float)

    monkeypatch.setitem(registry.PARAMS, "scorer", {})
    monkeypatch.setitem(registry.RANGES, "scorer", (0.0, math.inf))
    monkeypatch.setitem(REWARDS, "scorer", lambda s, p: float(batch([s], p)[0]))
    monkeypatch.setitem(registry.BATCHED, "scorer", batch)
    result = RewardFunction({"scorer": {"weight": 1.0}})([_sample("ab", "a"), _sample("bad", "b")])
    np.testing.assert_array_equal(result.total, [2.0, 0.0])
    assert [e["prompt_id"] for e in result.errors] == ["b"]


# --- the combination ------------------------------------------------------------------------------------------

def test_weighted_sum():
    spec = {"math": {"weight": 1.0}, "format": {"weight": 0.5, "rule": "answer_suffix"},
            "length": {"weight": 2.0, "max": 20, "ramp": 10}}
    samples = [_sample("The answer is 7.", answer="7"),  # 16 chars
               _sample("The answer is 7. Or maybe 8.", answer="7"),  # 28 chars: 8 over
               _sample("I think it is 8. The answer is 9.", answer="8")]  # 33 chars: 13 over
    result = RewardFunction(spec)(samples)
    np.testing.assert_allclose(result.components["math"], [1, 1, 0])
    np.testing.assert_allclose(result.components["format"], [1, 0, 1])
    np.testing.assert_allclose(result.components["length"], [0, -0.8, -1])
    # 1*math + 0.5*format + 2*length
    np.testing.assert_allclose(result.total, [1.5, 1 - 1.6, 0.5 - 2])
    assert result.valid.all() and result.errors == []


def test_scores_are_clamped_to_declared_ranges(monkeypatch, caplog):
    assert set(registry.RANGES) == set(REWARDS)
    monkeypatch.setitem(registry.PARAMS, "wild", {})
    monkeypatch.setitem(REWARDS, "wild", lambda s, p: float(s.completion))
    monkeypatch.setitem(registry.RANGES, "wild", (0.0, 1.0))
    with caplog.at_level(logging.WARNING):
        result = RewardFunction({"wild": {"weight": 2.0}})([_sample("1000", "p-hi"), _sample("-3", "p-lo"),
                                                            _sample("0.25", "p-ok")])
    np.testing.assert_array_equal(result.components["wild"], [1.0, 0.0, 0.25])
    np.testing.assert_array_equal(result.total, [2.0, 0.0, 0.5])
    assert "p-hi" in caplog.text and "p-lo" in caplog.text and "p-ok" not in caplog.text
    monkeypatch.delitem(registry.RANGES, "wild")
    with caplog.at_level(logging.WARNING):
        unclamped = RewardFunction({"wild": {"weight": 1.0}})
    assert "reward 'wild' declares no range" in caplog.text
    assert unclamped([_sample("1000")]).total[0] == 1000.0


# --- on_error -------------------------------------------------------------------------------------------------

@pytest.fixture
def boom(monkeypatch):
    """A reward that raises on prompt 'p-bad' and returns NaN on prompt 'p-nan'."""
    def fn(sample, params):
        if sample.prompt_id == "p-bad":
            raise ZeroDivisionError("division by zero")
        return math.nan if sample.prompt_id == "p-nan" else 1.0

    monkeypatch.setitem(registry.PARAMS, "boom", {})
    monkeypatch.setitem(registry.RANGES, "boom", (0.0, 1.0))
    monkeypatch.setitem(REWARDS, "boom", fn)
    spec = {"boom": {"weight": 2.0}, "length": {"weight": 1.0, "max": 1}}
    samples = [_sample("a", "p-ok"), _sample("b", "p-bad"), _sample("cc", "p-nan")]
    return spec, samples


def test_on_error_zero(boom, caplog):
    spec, samples = boom
    with caplog.at_level(logging.WARNING):
        result = RewardFunction(spec, on_error="zero")(samples)
    np.testing.assert_array_equal(result.components["boom"], [1, 0, 0])
    np.testing.assert_array_equal(result.total, [2, 0, -1])  # p-nan: 2*0 + length -1
    assert result.valid.all()
    assert [(e["prompt_id"], e["reward"]) for e in result.errors] == [("p-bad", "boom"), ("p-nan", "boom")]
    assert "ZeroDivisionError" in result.errors[0]["error"] and "not finite" in result.errors[1]["error"]
    assert "p-bad" in caplog.text and "p-nan" in caplog.text


def test_on_error_raise(boom):
    spec, samples = boom
    with pytest.raises(RuntimeError, match=r"reward 'boom' failed on prompt 'p-bad'.*division by zero"):
        RewardFunction(spec, on_error="raise")(samples)


def test_on_error_skip(boom):
    spec, samples = boom
    result = RewardFunction(spec, on_error="skip")(samples)
    np.testing.assert_array_equal(result.valid, [True, False, False])
    np.testing.assert_array_equal(result.total, [2, np.nan, np.nan])
    np.testing.assert_array_equal(result.components["length"], [0, 0, -1])  # other rewards still reported
    assert len(result.errors) == 2


def test_missing_record_field_names_key_and_prompt():
    result = RewardFunction({"math": {"weight": 1.0}})([_sample("The answer is 3.", "q-17")])
    assert "'answer'" in result.errors[0]["error"] and "q-17" in result.errors[0]["error"]


# --- configuration errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, on_error, message", [
    ({"maths": {"weight": 1.0}}, "zero", "unknown reward 'maths'. Did you mean 'math'?"),
    ({"format": {"weight": 1.0, "regx": "a"}}, "zero", "rewards.format.regx. Did you mean 'regex'?"),
    ({"math": {"weight": float("inf")}}, "zero", "rewards.math.weight must be a finite number"),
    ({"math": {"weight": "1"}}, "zero", "rewards.math.weight must be a finite number"),
    ({"math": {}}, "zero", "rewards.math has no 'weight'"),
    ({"math": 1.0}, "zero", "rewards.math must map 'weight' and parameters"),
    ({}, "zero", "no rewards configured"),
    ({"math": {"weight": 1.0}}, "ignore", "reward_on_error='ignore' must be one of"),
    ({"format": {"weight": 1.0}}, "zero", "exactly one of 'regex' and 'rule'"),
    ({"format": {"weight": 1.0, "rule": "answer_sufix"}}, "zero", "rewards.format.rule='answer_sufix'"),
    ({"format": {"weight": 1.0, "regex": "(a"}}, "zero", "not a valid regular expression"),
    ({"length": {"weight": 1.0}}, "zero", "rewards.length.max is required"),
    ({"length": {"weight": 1.0, "min": 5, "max": 2}}, "zero", "0 <= min <= max"),
    ({"length": {"weight": 1.0, "max": 2, "unit": "tokens"}}, "zero", "rewards.length.tokenizer is required"),
    ({"ifeval": {"weight": 1.0, "aggregate": "any"}}, "zero", "rewards.ifeval.aggregate='any'"),
    ({"code": {"weight": 1.0, "wall_seconds": 0}}, "zero", "rewards.code.wall_seconds must be positive"),
    ({"reward_model": {"weight": 1.0}}, "zero", "rewards.reward_model.checkpoint is required"),
])
def test_bad_spec(spec, on_error, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        RewardFunction(spec, on_error)


def test_from_config():
    cfg = ml_collections.ConfigDict()
    cfg.tokenizer = "embedded"
    cfg.rewards = ml_collections.ConfigDict(dict(math=dict(weight=1.0),
                                                 length=dict(weight=0.5, max=4, unit="tokens")))
    cfg.reward_on_error = "skip"
    reward = registry.from_config(cfg)
    assert reward.on_error == "skip" and reward.weights == {"math": 1.0, "length": 0.5}
    assert reward.params["length"]["tokenizer"] == "embedded"  # the policy's tokenizer
    assert reward([_sample("The answer is 3.", answer="3")]).components["math"][0] == 1.0
