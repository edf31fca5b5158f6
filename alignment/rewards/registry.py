"""Reward functions by name and their weighted combination, with an explicit policy for failures.

A reward is `fn(sample, params) -> float`, registered in `REWARDS`; `PARAMS` holds each one's parameters
and defaults (`REQUIRED` marks those without one). `RewardFunction` scores a batch with a weighted sum of
rewards, and a reward that raises is never silent: it is logged and recorded with the prompt id, then scored
per `on_error`.

Every score is clamped to its reward's declared range (`RANGES`), with a warning naming the reward and the
prompt when it was outside. Rewards run serially in the calling (main) thread: math-verify enforces its timeouts
with signals.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import re
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from alignment.config import suggest
from alignment.rewards import code_solutions, ifeval, math_answers, sandbox, verdict

logger = logging.getLogger(__name__)

ON_ERROR = ("zero", "raise", "skip")
REQUIRED = object()  # a parameter without a default


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion to score."""

    prompt_id: str
    prompt: list[dict]  # chat messages of the prompt
    completion: str  # generated text, special tokens stripped
    record: dict  # the prompt's source record: "answer", "instruction_id_list" + "kwargs", "tests", ...


@dataclasses.dataclass
class RewardResult:
    total: np.ndarray  # [n] weighted sum; NaN where a sample was skipped
    components: dict[str, np.ndarray]  # name -> [n] raw scores (0 or NaN where the reward failed)
    errors: list[dict]  # {"prompt_id", "reward", "error"} per failure
    valid: np.ndarray  # [n] bool: False where a sample was skipped


def _field(sample: Sample, key: str):
    if key not in sample.record:
        raise KeyError(f"record of prompt {sample.prompt_id!r} has no {key!r} field")
    return sample.record[key]


def _params(name: str, params: Mapping) -> dict:
    """`params` completed with the defaults of reward `name` and checked; errors name the offending key."""
    defaults = PARAMS[name]
    for key in params:
        if key not in defaults:
            raise ValueError(f"unknown parameter rewards.{name}.{key}.{suggest(key, defaults)} "
                             f"Parameters of {name!r}: {sorted(defaults)}")
    resolved = {**defaults, **params}
    for key, value in resolved.items():
        if value is REQUIRED:
            raise ValueError(f"rewards.{name}.{key} is required")
    _CHECKS.get(name, lambda p: None)(resolved)
    return resolved


def _one_of(name: str, key: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"rewards.{name}.{key}={value!r} must be one of {list(allowed)}")


# --- math -----------------------------------------------------------------------------------------------------

def math_reward(sample: Sample, params: Mapping) -> float:
    """1.0 when the final answer equals record["answer"]: exact number match (GSM8K rule) first, then symbolic
    equivalence (math-verify), since models also write numeric answers as LaTeX (\\frac{1}{2} for 0.5)."""
    _params("math", params)
    reference = str(_field(sample, "answer"))
    if "####" in reference:  # a whole GSM8K solution rather than its final number
        reference = math_answers.gsm8k_reference(reference)
    if math_answers.gsm8k_correct(sample.completion, reference):
        return 1.0
    return float(math_answers.math_equivalent(sample.completion, reference))


# --- format ---------------------------------------------------------------------------------------------------

# Named formats; the whole completion (surrounding whitespace stripped) must match. The number grammar is
# final_number's, so a completion in this format is one the math reward can read.
FORMAT_RULES = {
    "answer_suffix": r".*The answer is -?\$?\d[\d,]*(?:\.\d+)?\.",
}


def format_reward(sample: Sample, params: Mapping) -> float:
    """1.0 when the completion matches `regex` (or the named `rule`) as a whole, dot matching newlines."""
    p = _params("format", params)
    pattern = p["regex"] or FORMAT_RULES[p["rule"]]
    return float(re.fullmatch(pattern, sample.completion.strip(), re.DOTALL) is not None)


def _check_format(p: dict) -> None:
    if bool(p["regex"]) == bool(p["rule"]):
        raise ValueError("rewards.format needs exactly one of 'regex' and 'rule'")
    if p["rule"]:
        _one_of("format", "rule", p["rule"], sorted(FORMAT_RULES))
    try:
        re.compile(p["regex"])
    except re.error as e:
        raise ValueError(f"rewards.format.regex={p['regex']!r} is not a valid regular expression: {e}") from e


# --- length ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from alignment.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def length_reward(sample: Sample, params: Mapping) -> float:
    """0 inside [min, max], else a penalty growing linearly with the distance to the range, reaching -1 at
    `ramp` units outside it (ramp 0: a flat -1), so it never outweighs a correct answer of weight 1."""
    p = _params("length", params)
    if p["unit"] == "tokens":
        size = len(_tokenizer(p["tokenizer"]).encode(sample.completion))
    else:
        size = len(sample.completion)
    distance = max(p["min"] - size, size - p["max"], 0)
    if distance == 0:
        return 0.0
    return -1.0 if p["ramp"] == 0 else -min(1.0, distance / p["ramp"])


def _check_length(p: dict) -> None:
    _one_of("length", "unit", p["unit"], ("chars", "tokens"))
    if not 0 <= p["min"] <= p["max"]:
        raise ValueError(f"rewards.length needs 0 <= min <= max, got min={p['min']} max={p['max']}")
    if p["ramp"] < 0:
        raise ValueError(f"rewards.length.ramp must be >= 0, got {p['ramp']}")
    if p["unit"] == "tokens" and not p["tokenizer"]:
        raise ValueError("rewards.length.tokenizer is required when unit='tokens' (the policy's tokenizer)")


# --- instruction following ------------------------------------------------------------------------------------

def ifeval_reward(sample: Sample, params: Mapping) -> float:
    """The record's IFEval instructions followed: their fraction, or 1/0 for all of them (`aggregate`)."""
    p = _params("ifeval", params)
    ids, kwargs = _field(sample, "instruction_id_list"), _field(sample, "kwargs")
    if not ids or len(ids) != len(kwargs):
        raise ValueError(f"prompt {sample.prompt_id!r}: {len(ids)} instruction ids and {len(kwargs)} kwargs "
                         "entries; need the same positive number")
    followed = [ifeval.check_instruction(sample.completion, i, k, loose=p["loose"]) for i, k in zip(ids, kwargs)]
    return float(all(followed)) if p["aggregate"] == "all" else float(np.mean(followed))


def _check_ifeval(p: dict) -> None:
    _one_of("ifeval", "aggregate", p["aggregate"], ("fraction", "all"))
    _one_of("ifeval", "loose", p["loose"], (False, True))


# --- code -----------------------------------------------------------------------------------------------------

def code_reward(sample: Sample, params: Mapping) -> float:
    """Fraction of record["tests"] passed by the completion's code (its first fenced block, else all of it):
    an assert program or a list of them and of {"stdin", "stdout"} cases (see `verdict`). The tests are split
    into calls and expected values here; only the calls run in the sandbox and the returned values are checked
    here, so the program cannot forge its score. A program that crashes, hangs or exceeds a limit scores 0."""
    p = _params("code", params)
    suite = verdict.code_suite(_field(sample, "tests"), f"prompt {sample.prompt_id!r}")
    result = verdict.judge(code_solutions.extract_code(sample.completion), suite, sandbox.Limits(**p))
    return result.passed / result.total


def _check_code(p: dict) -> None:
    for key, value in p.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
            raise ValueError(f"rewards.code.{key} must be positive, got {value}")


# --- reward model ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _reward_model(checkpoint: str):
    """The preference stage's score_fn, loaded once per checkpoint."""
    from alignment.rewards.reward_model import load_reward_model  # imported lazily: it imports JAX, Flax and Orbax

    return load_reward_model(checkpoint)


def reward_model_scores(samples: Sequence[Sample], params: Mapping) -> np.ndarray:
    """Scores of the whole batch in one call of the reward model (prompt + completion as the last turn)."""
    p = _params("reward_model", params)
    chats = [[*s.prompt, {"role": "assistant", "content": s.completion}] for s in samples]
    scores = np.asarray(_reward_model(p["checkpoint"])(chats), dtype=np.float64)
    if scores.shape != (len(samples),):
        raise ValueError(f"reward model returned scores of shape {scores.shape} for {len(samples)} chats")
    return scores


def reward_model_reward(sample: Sample, params: Mapping) -> float:
    return float(reward_model_scores([sample], params)[0])


# --- the registry ---------------------------------------------------------------------------------------------

REWARDS: dict[str, Callable[[Sample, Mapping], float]] = {
    "math": math_reward,
    "format": format_reward,
    "length": length_reward,
    "ifeval": ifeval_reward,
    "code": code_reward,
    "reward_model": reward_model_reward,
}
# Rewards that score a whole batch at once (one model call); RewardFunction prefers these.
BATCHED: dict[str, Callable[[Sequence[Sample], Mapping], np.ndarray]] = {"reward_model": reward_model_scores}
PARAMS: dict[str, dict] = {
    "math": {},
    "format": {"regex": "", "rule": ""},  # exactly one: a regular expression or a FORMAT_RULES name
    "length": {"min": 0, "max": REQUIRED, "unit": "chars", "tokenizer": "", "ramp": 0},
    "ifeval": {"loose": False, "aggregate": "fraction"},  # aggregate: fraction | all
    "code": {f.name: getattr(sandbox.Limits(), f.name) for f in dataclasses.fields(sandbox.Limits)},
    "reward_model": {"checkpoint": REQUIRED},
}
_CHECKS = {"format": _check_format, "length": _check_length, "ifeval": _check_ifeval, "code": _check_code}
# Declared [low, high] of each reward; scores are clamped into it. A reward registered without one (a test's)
# is not clamped, with a warning when a RewardFunction uses it.
RANGES: dict[str, tuple[float, float]] = {
    "math": (0.0, 1.0),
    "format": (0.0, 1.0),
    "length": (-1.0, 0.0),
    "ifeval": (0.0, 1.0),
    "code": (0.0, 1.0),
    "reward_model": (-math.inf, math.inf),  # a learned scalar: no natural bound
}


def _finite(value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward is not finite: {value}")
    return value


def _clamp(name: str, prompt_id: str, value: float) -> float:
    low, high = RANGES.get(name, (-math.inf, math.inf))
    if low <= value <= high:
        return value
    logger.warning("reward %r scored %r on prompt %r, outside its range [%g, %g]: clamped", name, value, prompt_id,
                   low, high)
    return min(max(value, low), high)


def _attempt(fn: Callable[[Sample, Mapping], float], sample: Sample, params: Mapping) -> float | Exception:
    try:
        return _finite(fn(sample, params))
    except Exception as e:  # noqa: BLE001 -- every failure is reported and scored by the on_error policy
        return e


class RewardFunction:
    """Weighted sum of named rewards; `spec` maps name -> {"weight": w, **params}. A weight of 0 records a
    component without training on it."""

    def __init__(self, spec: Mapping[str, Mapping], on_error: str = "zero"):
        if on_error not in ON_ERROR:
            raise ValueError(f"reward_on_error={on_error!r} must be one of {list(ON_ERROR)}")
        if not spec:
            raise ValueError(f"no rewards configured; available: {sorted(REWARDS)}")
        self.on_error = on_error
        self.weights: dict[str, float] = {}
        self.params: dict[str, dict] = {}
        for name, entry in spec.items():
            if name not in REWARDS:
                raise ValueError(f"unknown reward {name!r}.{suggest(name, REWARDS)} Available: {sorted(REWARDS)}")
            if name not in RANGES:
                logger.warning("reward %r declares no range in registry.RANGES: its scores are not clamped", name)
            if not isinstance(entry, Mapping):
                raise ValueError(f"rewards.{name} must map 'weight' and parameters to values, got {entry!r}")
            params = dict(entry)
            if "weight" not in params:
                raise ValueError(f"rewards.{name} has no 'weight'")
            weight = params.pop("weight")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"rewards.{name}.weight must be a finite number, got {weight!r}")
            self.weights[name] = float(weight)
            self.params[name] = _params(name, params)

    def _outcomes(self, name: str, samples: Sequence[Sample]) -> list[float | Exception]:
        params = self.params[name]
        if name in BATCHED and samples:
            try:
                return [_finite(x) for x in BATCHED[name](samples, params)]
            except Exception as e:  # noqa: BLE001 -- rescored one by one below, so each failure names its prompt
                logger.warning("batched reward %r failed (%s: %s); scoring its samples one at a time", name,
                               type(e).__name__, e)
        return [_attempt(REWARDS[name], s, params) for s in samples]

    def __call__(self, samples: Sequence[Sample]) -> RewardResult:
        n = len(samples)
        components, errors, valid = {}, [], np.ones(n, dtype=bool)
        for name in self.params:
            scores = np.zeros(n)
            for i, (sample, outcome) in enumerate(zip(samples, self._outcomes(name, samples))):
                if isinstance(outcome, float):
                    scores[i] = _clamp(name, sample.prompt_id, outcome)
                    continue
                error = f"{type(outcome).__name__}: {outcome}"
                if self.on_error == "raise":
                    raise RuntimeError(f"reward {name!r} failed on prompt {sample.prompt_id!r}: {error}") from outcome
                logger.warning("reward %r failed on prompt %r (scored per on_error=%r): %s", name, sample.prompt_id,
                               self.on_error, error)
                errors.append({"prompt_id": sample.prompt_id, "reward": name, "error": error})
                if self.on_error == "skip":
                    scores[i], valid[i] = np.nan, False
            components[name] = scores
        total = sum((self.weights[name] * scores for name, scores in components.items()), np.zeros(n))
        return RewardResult(np.where(valid, total, np.nan), components, errors, valid)


def from_config(cfg: ml_collections.ConfigDict) -> RewardFunction:
    """The reward of a stage config: `cfg.rewards` (name -> {weight, ...}) and `cfg.reward_on_error`. A length
    reward counted in tokens uses the policy's tokenizer (`cfg.tokenizer`) unless it names one."""
    spec = cfg.rewards.to_dict()
    length = spec.get("length")
    if isinstance(length, dict) and length.get("unit") == "tokens" and "tokenizer" in cfg:
        length.setdefault("tokenizer", cfg.tokenizer)
    return RewardFunction(spec, cfg.reward_on_error)
