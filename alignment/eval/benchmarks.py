"""Benchmarks by name: how to load samples, score responses and aggregate the per-sample results.

A sample is {"id", "messages", "category", ...fields its scorer needs}. `score(samples, responses, ctx)`
returns one JSON-serialisable result per sample, always with "id", "category" and "score" (the sample's
headline value in [0, 1]); `aggregate(results, ctx)` gives {"metrics": {...}, "categories": {category: mean
score}}, optionally "counts" (integers such as unparsed judgements). The first metric is the headline
shown in charts. A loader returns {"id", "category", "skipped": reason} in place of a sample that cannot be
scored (a HumanEval problem whose tests cannot be split into calls and expected values); `split_skipped`
separates these, so the runner generates nothing for them and reports each one.

`data_path(name, configured)` is the file a benchmark reads: the configured path, else the copy shipped with the
package (IFEval's prompts, under alignment/eval/data/), else an error saying where to get the file and its format.

JSONL formats of the judged benchmarks that have no public file here (one object per line):
  sysbench:  {"id", "system", "turns": [{"user", "assistant" (reference, used as history), "criteria": [..]}],
              "category"?}
  fbbench:   {"id", "messages", "checklist": [{"criterion", "weight"}], "category"?}
  ux:        {"id", "messages", "criteria": [..], "category"}
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.resources
import json
from typing import Callable

import numpy as np

from alignment.data.sources import read_jsonl
from alignment.data.synthetic import arithmetic_dataset
from alignment.eval import checklist, function_calling
from alignment.rewards import code_solutions, ifeval, math_answers, registry, sandbox, verdict

GSM8K_SUFFIX = "\nSolve the problem step by step, then give the final number as 'The answer is N.'"
MATH_SUFFIX = "\nSolve the problem step by step and put the final answer in \\boxed{}."
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one "
                         "```python code block.\n\n```python\n{prompt}```")


@dataclasses.dataclass
class Context:
    """What scorers may need besides the responses."""
    judge: Callable[[list[dict]], list] | None = None  # judge.judge_checklists bound to an endpoint + cache
    sandbox_limits: sandbox.Limits = dataclasses.field(default_factory=sandbox.Limits)
    pass_k: tuple[int, ...] = (1,)  # k values of pass@k (each must be <= samples per problem)
    sandbox_workers: int = 4  # programs run at once (each is its own process)

    def require_judge(self, benchmark: str) -> Callable:
        if self.judge is None:
            raise ValueError(f"benchmark {benchmark!r} is judged by an LLM: set config.judge.endpoint")
        return self.judge


@dataclasses.dataclass(frozen=True)
class Benchmark:
    load: Callable[..., list[dict]]  # (path, limit (0 = all), seed, **options) -> samples
    score: Callable[[list[dict], list[str], Context], list[dict]]
    aggregate: Callable[[list[dict], Context], dict]
    judged: bool = False  # scored by the LLM judge (needs config.judge.endpoint)
    sampled: bool = False  # scored over several responses per prompt (config.num_samples), e.g. pass@k
    source: str = ""  # the data file: what it holds, the fields the loader reads, where to get it; '' = no file
    shipped: str = ""  # the copy installed with the package, under alignment/eval/data/; read when no path is set
    options: str = ""  # the config block holding the loader's keyword options (and its max_tokens), if any


def data_path(name: str, configured: str) -> str:
    """The file benchmark `name` reads: `configured`, else its shipped copy; '' for a benchmark without a file.
    ValueError, saying where to get the file and what it must hold, when it has neither."""
    spec = BENCHMARKS[name]
    if configured or not spec.source:
        return configured
    if spec.shipped:
        return str(importlib.resources.files(__package__).joinpath("data", spec.shipped))
    raise ValueError(f"benchmark {name!r} needs config.data.{name}: {spec.source}")


def skipped(sample_id: str, category: str, reason: str) -> dict:
    """What a loader returns for a sample it cannot score."""
    return {"id": sample_id, "category": category, "skipped": reason}


def split_skipped(samples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the samples to generate for, [{"id", "reason"}] for the skipped ones, each id once)."""
    reasons = {s["id"]: s["skipped"] for s in samples if "skipped" in s}
    return [s for s in samples if "skipped" not in s], [{"id": i, "reason": r} for i, r in reasons.items()]


def _require(record: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def _limited(records, limit: int):
    for index, item in enumerate(records):
        if limit and index >= limit:
            return
        yield item


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _mean_by_category(results: list[dict]) -> dict:
    groups = collections.defaultdict(list)
    for r in results:
        groups[r["category"]].append(r["score"])
    return {c: float(np.mean(v)) for c, v in sorted(groups.items())}


def _accuracy(results: list[dict], ctx: Context) -> dict:
    return {"metrics": {"accuracy": float(np.mean([r["score"] for r in results]))},
            "categories": _mean_by_category(results)}


# ---- arithmetic (embedded default), GSM8K, MATH ----

def load_arithmetic(path: str, limit: int, eval_seed: int, *, num_problems: int, **generator) -> list[dict]:
    """The embedded task's problems from its generator (`generator`: arithmetic_dataset's options with its own
    `seed`, so eval_seed is not used; the eval config's defaults are the main job's held-out prompts)."""
    records = arithmetic_dataset(min(limit, num_problems) if limit else num_problems, **generator)
    return [{"id": f"arithmetic-{i}", "messages": r["messages"][:1], "category": r["category"],
             "answer": r["answer"]} for i, r in enumerate(records)]


def score_math_reward(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    """Correct when the `math` reward RL trains on gives 1 (GSM8K number match, then symbolic equivalence), so
    an accuracy here is the held-out accuracy an RL run logs on the same prompts."""
    return [{"id": s["id"], "category": s["category"], "answer": s["answer"],
             "predicted": math_answers.final_number(r),
             "score": float(registry.math_reward(registry.Sample(s["id"], s["messages"], r, s), {}) >= 1.0)}
            for s, r in zip(samples, responses)]


def load_gsm8k(path: str, limit: int, seed: int) -> list[dict]:
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        _require(record, ("question", "answer"), f"{path}:{number}")
        try:
            answer = math_answers.gsm8k_reference(record["answer"])
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        samples.append({"id": f"gsm8k-{number}", "messages": _user(record["question"] + GSM8K_SUFFIX),
                        "category": "math", "answer": answer})
    return samples


def score_numeric(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    return [{"id": s["id"], "category": s["category"], "answer": s["answer"],
             "predicted": math_answers.final_number(r), "score": float(math_answers.gsm8k_correct(r, s["answer"]))}
            for s, r in zip(samples, responses)]


def load_math(path: str, limit: int, seed: int) -> list[dict]:
    """MATH-style JSONL: {"problem", "answer"} (or a "solution" whose \\boxed{} holds it), optional "type"."""
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        _require(record, ("problem",), f"{path}:{number}")
        if "answer" not in record and "solution" not in record:
            raise ValueError(f"{path}:{number}: needs 'answer' or 'solution'")
        samples.append({"id": f"math-{number}", "messages": _user(record["problem"] + MATH_SUFFIX),
                        "category": str(record.get("type", record.get("subject", "math"))),
                        "answer": record.get("answer", record.get("solution"))})
    return samples


def score_math(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    return [{"id": s["id"], "category": s["category"], "answer": s["answer"],
             "score": float(math_answers.math_equivalent(r, s["answer"]))} for s, r in zip(samples, responses)]


# ---- HumanEval ----

def load_humaneval(path: str, limit: int, seed: int) -> list[dict]:
    """A problem whose test cannot be judged (built with loops, helpers or random inputs; see `verdict`) is
    returned as skipped, with the reason, and left out of pass@k; a record missing a field stops the load."""
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        _require(record, ("task_id", "prompt", "test", "entry_point"), f"{path}:{number}")
        try:
            verdict.humaneval_suite(record["test"], record["entry_point"],
                                    f"{path}:{number}: task {record['task_id']!r}")
        except ValueError as e:
            samples.append(skipped(str(record["task_id"]), "code", str(e)))
            continue
        samples.append({"id": str(record["task_id"]), "category": "code",
                        "messages": _user(HUMANEVAL_INSTRUCTION.format(prompt=record["prompt"])),
                        **{k: record[k] for k in ("prompt", "test", "entry_point")}})
    return samples


def score_humaneval(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    """Judge each response against its problem's tests (calls in the sandbox, checks here); samples of one
    problem share an id."""
    def judge(sample: dict, response: str) -> verdict.Verdict:
        suite = verdict.humaneval_suite(sample["test"], sample["entry_point"], f"humaneval task {sample['id']!r}")
        solution = code_solutions.completion_solution(sample["prompt"], response, sample["entry_point"])
        return verdict.judge(solution, suite, ctx.sandbox_limits)

    with concurrent.futures.ThreadPoolExecutor(max(1, ctx.sandbox_workers)) as pool:
        verdicts = list(pool.map(judge, samples, responses))
    return [{"id": s["id"], "category": s["category"], "score": float(v.status == "passed"), "status": v.status,
             "reason": v.reason[:500]} for s, v in zip(samples, verdicts)]


def aggregate_humaneval(results: list[dict], ctx: Context) -> dict:
    by_problem = collections.defaultdict(list)
    for r in results:
        by_problem[r["id"]].append(bool(r["score"]))
    outcomes = list(by_problem.values())
    return {"metrics": {f"pass@{k}": code_solutions.mean_pass_at_k(outcomes, k) for k in ctx.pass_k},
            "categories": _mean_by_category(results)}


# ---- IFEval ----

def load_ifeval(path: str, limit: int, seed: int) -> list[dict]:
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        where = f"{path}:{number}"
        _require(record, ("key", "prompt", "instruction_id_list", "kwargs"), where)
        unknown = [i for i in record["instruction_id_list"] if i not in ifeval.INSTRUCTIONS]
        if unknown or len(record["kwargs"]) != len(record["instruction_id_list"]):
            raise ValueError(f"{where}: unknown instruction ids {unknown} or kwargs of the wrong length")
        samples.append({"id": f"ifeval-{record['key']}", "messages": _user(record["prompt"]),
                        "category": "instruction_following",
                        "instruction_ids": record["instruction_id_list"], "kwargs": record["kwargs"]})
    return samples


def score_ifeval(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    results = []
    for s, r in zip(samples, responses):
        outcome = ifeval.evaluate_sample(r, s["instruction_ids"], s["kwargs"])
        results.append({"id": s["id"], "category": s["category"], "score": float(all(outcome["strict"])),
                        **outcome})
    return results


def aggregate_ifeval(results: list[dict], ctx: Context) -> dict:
    metrics = ifeval.accuracies(results)
    # Per-category chart: instruction groups (keywords, length_constraints, ...), strict instruction level.
    groups = collections.defaultdict(list)
    for r in results:
        for instruction_id, ok in zip(r["instruction_ids"], r["strict"]):
            groups[instruction_id.split(":")[0]].append(ok)
    categories = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
    by_type = metrics.pop("by_type_strict")
    return {"metrics": metrics, "categories": categories, "by_type_strict": by_type}


# ---- checklist benchmarks (LLM judge) ----

def _judged(samples: list[dict], responses: list[str], ctx: Context, name: str) -> list:
    judge = ctx.require_judge(name)
    return judge([{"id": s["id"], "messages": s["messages"], "response": r, "criteria": s["criteria"],
                   "reference": s.get("reference", "")} for s, r in zip(samples, responses)])


def _judge_counts(results: list[dict]) -> dict:
    """Samples whose judge never answered in the expected form; they scored 0 and are reported."""
    return {"judge_unparsed": sum(not r["judge_parsed"] for r in results)}


def _judgement_fields(j) -> dict:
    return {"judgements": j.scores, "judge_parsed": j.parsed, "judge_raw": j.raw}


def load_cfbench(path: str, limit: int, seed: int) -> list[dict]:
    """CFBench's JSON list: prompt, gold (reference), split (easy/hard), criteria [[text, 主需|次需, ...]]."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    samples = []
    for index, record in _limited(enumerate(records), limit):
        where = f"{path}[{index}]"
        _require(record, ("idx", "prompt", "criteria"), where)
        priorities = [c[1] if len(c) > 1 else None for c in record["criteria"]]
        if not record["criteria"] or any(p not in checklist.CFBENCH_PRIORITY for p in priorities):
            raise ValueError(f"{where}: criteria must be non-empty [text, 主需|次需, ...] lists")
        samples.append({"id": f"cfbench-{record['idx']}", "messages": _user(record["prompt"]),
                        "category": record.get("split", "all"), "reference": record.get("gold", ""),
                        "criteria": [c[0] for c in record["criteria"]],
                        "priorities": [checklist.CFBENCH_PRIORITY[p] for p in priorities]})
    return samples


def score_cfbench(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    results = []
    for s, j in zip(samples, _judged(samples, responses, ctx, "cfbench")):
        results.append({"id": s["id"], "category": s["category"], "priorities": s["priorities"],
                        "score": checklist.psr(j.scores, s["priorities"]), **_judgement_fields(j)})
    return results


def aggregate_cfbench(results: list[dict], ctx: Context) -> dict:
    metrics = checklist.cfbench_metrics([r["judgements"] for r in results], [r["priorities"] for r in results])
    return {"metrics": {"PSR": metrics["PSR"], "CSR": metrics["CSR"], "ISR": metrics["ISR"]},
            "categories": _mean_by_category(results), "counts": _judge_counts(results)}


def load_sysbench(path: str, limit: int, seed: int) -> list[dict]:
    """One sample per turn; earlier turns come from the data (user + reference assistant), so each turn is
    judged on the same history for every checkpoint."""
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        where = f"{path}:{number}"
        _require(record, ("id", "system", "turns"), where)
        history = [{"role": "system", "content": record["system"]}]
        for t, turn in enumerate(record["turns"]):
            _require(turn, ("user", "criteria"), f"{where} turn {t}")
            history.append({"role": "user", "content": turn["user"]})
            samples.append({"id": f"{record['id']}/{t}", "session": str(record["id"]), "turn": t,
                            "messages": list(history), "criteria": turn["criteria"],
                            "category": record.get("category", "all")})
            history.append({"role": "assistant", "content": turn.get("assistant", "")})
    return samples


def score_sysbench(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    return [{"id": s["id"], "session": s["session"], "turn": s["turn"], "category": s["category"],
             "score": checklist.isr(j.scores), **_judgement_fields(j)}
            for s, j in zip(samples, _judged(samples, responses, ctx, "sysbench"))]


def aggregate_sysbench(results: list[dict], ctx: Context) -> dict:
    sessions = collections.defaultdict(dict)
    for r in results:
        sessions[r["session"]][r["turn"]] = r["judgements"]
    ordered = [[turns[t] for t in sorted(turns)] for turns in sessions.values()]
    metrics = checklist.sysbench_metrics(ordered)
    return {"metrics": {"SSR": metrics["SSR"], "CSR": metrics["CSR"], "ISR": metrics["ISR"]},
            "categories": _mean_by_category(results), "counts": _judge_counts(results)}


def load_fbbench(path: str, limit: int, seed: int) -> list[dict]:
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        where = f"{path}:{number}"
        _require(record, ("id", "messages", "checklist"), where)
        for item in record["checklist"]:
            _require(item, ("criterion", "weight"), f"{where} checklist")
        samples.append({"id": str(record["id"]), "messages": record["messages"],
                        "category": record.get("category", "all"),
                        "criteria": [c["criterion"] for c in record["checklist"]],
                        "weights": [float(c["weight"]) for c in record["checklist"]]})
    return samples


def score_fbbench(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    return [{"id": s["id"], "category": s["category"], "weights": s["weights"],
             "score": checklist.weighted_score(j.scores, s["weights"]), **_judgement_fields(j)}
            for s, j in zip(samples, _judged(samples, responses, ctx, "fbbench"))]


def aggregate_weighted(results: list[dict], ctx: Context) -> dict:
    return {"metrics": {"score": float(np.mean([r["score"] for r in results]))},
            "categories": _mean_by_category(results), "counts": _judge_counts(results)}


def load_ux(path: str, limit: int, seed: int) -> list[dict]:
    samples = []
    for number, record in _limited(read_jsonl(path), limit):
        _require(record, ("id", "messages", "criteria", "category"), f"{path}:{number}")
        samples.append({"id": str(record["id"]), "messages": record["messages"], "category": record["category"],
                        "criteria": record["criteria"]})
    return samples


def score_ux(samples: list[dict], responses: list[str], ctx: Context) -> list[dict]:
    return [{"id": s["id"], "category": s["category"], "score": checklist.isr(j.scores), **_judgement_fields(j)}
            for s, j in zip(samples, _judged(samples, responses, ctx, "ux"))]


def aggregate_ux(results: list[dict], ctx: Context) -> dict:
    rates = checklist.pass_rate_by_category([r["judgements"] for r in results], [r["category"] for r in results])
    return {"metrics": {"pass_rate": rates.pop("all")},
            "categories": rates, "counts": _judge_counts(results)}


# What each benchmark's data file holds (the fields its loader reads) and where to get it: the error when
# config.data.<name> is not set.
GSM8K_SOURCE = ("the GSM8K test split, JSONL of {question, answer} whose answer ends in a line '#### N': "
                "grade_school_math/data/test.jsonl of https://github.com/openai/grade-school-math (MIT licence), "
                "or the Hugging Face dataset openai/gsm8k (config main, split test) written out as JSONL")
MATH_SOURCE = ("MATH-style JSONL of {problem, answer (or a solution with the answer in \\boxed{}), type or subject "
               "optional}, e.g. test.jsonl of the Hugging Face dataset HuggingFaceH4/MATH-500")
HUMANEVAL_SOURCE = ("HumanEval JSONL of {task_id, prompt, test, entry_point}: data/HumanEval.jsonl.gz of "
                    "https://github.com/openai/human-eval (MIT licence), decompressed with gunzip")
IFEVAL_SOURCE = "IFEval JSONL of {key, prompt, instruction_id_list, kwargs}"
CFBENCH_SOURCE = ("CFBench's JSON list of {idx, prompt, criteria: [[text, '主需' or '次需', ...]], gold and split "
                  "optional}: data/cfbench_data.json of https://github.com/PKU-Baichuan-MLSystemLab/CFBench "
                  "(the repository states no licence)")
SYSBENCH_SOURCE = ("JSONL sessions of {id, system, turns: [{user, assistant (the reference reply), criteria}], "
                   "category optional}, e.g. converted from https://github.com/PKU-Baichuan-MLSystemLab/SysBench")
FBBENCH_SOURCE = ("JSONL of {id, messages, checklist: [{criterion, weight}], category optional}, e.g. converted from "
                  "https://github.com/PKU-Baichuan-MLSystemLab/FB-Bench")
UX_SOURCE = "JSONL of {id, messages, criteria, category}: your own user-experience set (there is no public one)"

BENCHMARKS: dict[str, Benchmark] = {
    "arithmetic": Benchmark(load_arithmetic, score_math_reward, _accuracy, options="arithmetic"),
    "gsm8k": Benchmark(load_gsm8k, score_numeric, _accuracy, source=GSM8K_SOURCE),
    "math": Benchmark(load_math, score_math, _accuracy, source=MATH_SOURCE),
    "humaneval": Benchmark(load_humaneval, score_humaneval, aggregate_humaneval, sampled=True,
                           source=HUMANEVAL_SOURCE),
    "ifeval": Benchmark(load_ifeval, score_ifeval, aggregate_ifeval, source=IFEVAL_SOURCE,
                        shipped="ifeval/input_data.jsonl"),
    "cfbench": Benchmark(load_cfbench, score_cfbench, aggregate_cfbench, judged=True, source=CFBENCH_SOURCE),
    "sysbench": Benchmark(load_sysbench, score_sysbench, aggregate_sysbench, judged=True, source=SYSBENCH_SOURCE),
    "fbbench": Benchmark(load_fbbench, score_fbbench, aggregate_weighted, judged=True, source=FBBENCH_SOURCE),
    "ux": Benchmark(load_ux, score_ux, aggregate_ux, judged=True, source=UX_SOURCE),
    "function_calling": Benchmark(function_calling.load, function_calling.score, function_calling.aggregate,
                                  source=function_calling.SOURCE, shipped="function_calling/items.jsonl"),
}
