"""Recipe 6 (report 4.3): reasoning. Chain-of-thought solutions and reflection traces, both verified against the
reference, with a knob on the difficulty distribution.

Problems carry a difficulty (easy / medium / hard); `easy_keep` keeps that share of the easy ones (the report
reduces their share). A `reflection_share` of the problems go to reflection: a student (the teacher endpoint asked
for a quick final answer) answers first; when it is wrong, the teacher gets the problem, that wrong answer and the
reference and writes a trace that revisits the attempt, finds the mistake and corrects it. A trace is kept when its
final answer equals the reference, it quotes the wrong answer, it reflects (names a mistake or a check) and, after
sentences mentioning the reference are removed, still ends in its answer. The rest get chain-of-thought solutions
(reference-guided like the math recipe), kept when the final answer matches.
"""
from __future__ import annotations

import collections
import re

import numpy as np

from alignment.config import Field, positive
from alignment.rewards import math_answers
from alignment.synth import pools
from alignment.synth.driver import Result, Session, generate_verified, sft_record
from alignment.synth.math_solutions import strip_reference

NAME = "reasoning"
FIELDS = {"num_items": positive(), "attempts": positive(), "easy_keep": Field(low=0, high=1),
          "reflection_share": Field(low=0, high=1)}
DIFFICULTIES = ("easy", "medium", "hard")
COT_SYSTEM = (
    "Think the problem through step by step, one step per line, then end with the line 'The answer is X.' A reference "
    "answer comes with the problem; it is correct with 95% probability. Use it only to check your reasoning, and "
    "never mention the reference or that an answer was given.")
STUDENT_SYSTEM = "Answer the problem at once with the final answer only, as 'The answer is X.'"
REFLECT_SYSTEM = (
    "A first attempt at the problem gave a wrong answer. Write the solution as a trace that starts from that attempt, "
    "checks it, says where it went wrong, and reasons to the correct answer, ending with the line 'The answer is X.' "
    "The correct answer is given only so that the trace reaches it: never mention that it was given.")
_REFLECTS = re.compile(r"\b(wait|mistake|wrong|error|re-?check|let me check|does not hold|incorrect)\b", re.IGNORECASE)
_NAMES = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_ITEMS = ["apples", "books", "coins", "marbles", "stamps"]


def _ordering(rng, difficulty):
    count = {"easy": 3, "medium": 4, "hard": 5}[difficulty]
    people = [str(n) for n in rng.permutation(_NAMES)[:count]]  # tallest first
    clues = [f"{a} is taller than {b}." for a, b in zip(people, people[1:])]
    clues = [clues[i] for i in rng.permutation(len(clues))]
    shortest = bool(rng.integers(2))
    question = "Who is the shortest?" if shortest else "Who is the tallest?"
    return " ".join(clues + [question]), people[-1] if shortest else people[0]


def _weekday(rng, difficulty):
    start, offset = int(rng.integers(7)), int(rng.integers(*{"easy": (1, 7), "medium": (7, 40), "hard": (40, 400)}[
        difficulty]))
    if difficulty == "hard":
        return (f"Today is {_DAYS[start]}. What day of the week will it be {offset} days after the day before "
                "yesterday?", _DAYS[(start - 2 + offset) % 7])
    return f"Today is {_DAYS[start]}. What day of the week will it be in {offset} days?", _DAYS[(start + offset) % 7]


def _counting(rng, difficulty):
    a, b, c, d = (int(x) for x in rng.integers(2, 12, 4))
    item = str(rng.choice(_ITEMS))
    if difficulty == "easy":
        return f"There are {a} boxes with {b} {item} in each. How many {item} are there?", str(a * b)
    if difficulty == "medium":
        return (f"There are {a} boxes with {b} {item} in each, and {c} {item} are taken out. How many {item} are "
                "left?", str(a * b - c))
    return (f"There are {a} boxes with {b} {item} in each. {c} {item} are taken out, {d} more boxes of {b} arrive, "
            f"and the {item} are shared equally by {a + d} people, the rest set aside. How many {item} does each "
            "person get?", str((a * b - c + d * b) // (a + d)))


def _syllogism(rng, difficulty):
    x, y, z = (str(w) for w in rng.permutation(["bloops", "razzies", "lazzies", "wumps", "gorks"])[:3])
    if difficulty == "easy":
        return f"All {x} are {y}. All {y} are {z}. Must all {x} be {z}? Answer yes or no.", "yes"
    if difficulty == "medium":
        return f"All {x} are {y}. Some {y} are {z}. Must some {x} be {z}? Answer yes or no.", "no"
    return (f"No {x} are {y}. All {z} are {y}. Can any {z} be {x}? Answer yes or no.", "no")


GENERATORS = (_ordering, _weekday, _counting, _syllogism)


def embedded_pool(num: int, seed: int) -> list[dict]:
    """`num` generated puzzles, kinds and difficulties in turn."""
    rng, pool = np.random.default_rng(seed), []
    for index in range(num):
        difficulty = DIFFICULTIES[index // len(GENERATORS) % len(DIFFICULTIES)]
        problem, answer = GENERATORS[index % len(GENERATORS)](rng, difficulty)
        pool.append({"problem": problem, "answer": answer, "difficulty": difficulty})
    return pool


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    """The pool (a JSONL of {problem, answer, difficulty} or 'embedded') with only `easy_keep` of its easy problems;
    each item marked for reflection or chain of thought."""
    if options.problems == pools.EMBEDDED:
        pool = embedded_pool(options.num_items, seed)
    else:
        fields = {"problem": str, "answer": str, "difficulty": str}
        pool = pools.read_records(options.problems, fields)[:options.num_items]
        bad = [p["where"] for p in pool if p["difficulty"] not in DIFFICULTIES]
        if bad:
            raise ValueError(f"{bad[0]}: difficulty must be one of {list(DIFFICULTIES)}")
    rng = np.random.default_rng(seed)
    easy = [i for i, p in enumerate(pool) if p["difficulty"] == "easy"]
    dropped = set(rng.permutation(easy)[:len(easy) - round(options.easy_keep * len(easy))].tolist())
    kept = [p for i, p in enumerate(pool) if i not in dropped]
    return [{**p, "id": f"reasoning-{i}", "reflect": bool(rng.random() < options.reflection_share)}
            for i, p in enumerate(kept)], {"easy_share_reduction": len(dropped)}


def final_answer(text: str) -> str | None:
    """The sentence after the last 'answer is', without emphasis or end punctuation; None when there is none."""
    hits = list(re.finditer(r"answer is:?", text, re.IGNORECASE))
    if not hits:
        return None
    sentence = re.split(r"[.!](?:\s|$)", text[hits[-1].end():].split("\n")[0])[0]
    return sentence.strip(" .!*\"'") or None


def same_answer(given: str | None, reference: str) -> bool:
    """Words compared case- and article-insensitively; numbers numerically."""
    if given is None:
        return False
    if re.fullmatch(r"-?\d+(\.\d+)?", reference.strip()):
        return math_answers.gsm8k_correct(given, reference)
    normal = lambda s: re.sub(r"^(the|a|an)\s+", "", s.strip().lower()).strip(" .")  # noqa: E731
    return normal(given) == normal(reference)


def cot_failures(reply: str, reference: str) -> list[str]:
    solution, _ = strip_reference(reply)
    answer = final_answer(solution)
    if answer is None:
        return ["reasoning:no_final_answer"]
    failures = [] if len([line for line in solution.splitlines() if line.strip()]) >= 2 else ["reasoning:no_steps"]
    return failures + ([] if same_answer(answer, reference) else ["reasoning:wrong_final_answer"])


def reflection_failures(reply: str, reference: str, wrong: str) -> list[str]:
    trace, _ = strip_reference(reply)
    failures = cot_failures(trace, reference)
    if wrong.lower() not in trace.lower():
        failures.append("reflection:ignores_first_attempt")
    if not _REFLECTS.search(trace):
        failures.append("reflection:no_reflection")
    return failures


def _record(item: dict, solution: str, kind: str) -> dict:
    return sft_record(item["id"], NAME, "reasoning", [{"role": "user", "content": item["problem"]},
                                                      {"role": "assistant", "content": solution}],
                      answer=item["answer"], difficulty=item["difficulty"], trace=kind)


def _clean(reply: str) -> str:
    return strip_reference(reply)[0]


def synthesize(item: dict, session: Session, options) -> Result:
    result = Result(item["id"], facts={"difficulty": item["difficulty"]})
    shown = [{"role": "user", "content": item["problem"]}]
    request = f"Problem: {item['problem']}\nReference answer: {item['answer']}"
    if item["reflect"]:
        student = session.ask([{"role": "system", "content": STUDENT_SYSTEM},
                               {"role": "user", "content": item["problem"]}], (item["id"], "student"))
        wrong = final_answer(student)
        if wrong is not None and not same_answer(wrong, item["answer"]):
            messages = [{"role": "system", "content": REFLECT_SYSTEM},
                        {"role": "user", "content": f"Problem: {item['problem']}\nFirst attempt: The answer is {wrong}."
                                                    f"\nCorrect answer: {item['answer']}"}]
            verify = lambda reply: reflection_failures(reply, item["answer"], wrong)  # noqa: E731
            reply = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "reflect"),
                                      shown, _clean)
            if reply is None:
                return result.drop("reflection_rejected")
            result.facts["trace"] = "reflection"
            result.records.append(_record(item, reply, "reflection"))
            return result
        result.facts["student_correct"] = wrong is not None
    messages = [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": request}]
    verify = lambda reply: cot_failures(reply, item["answer"])  # noqa: E731
    reply = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "cot"), shown, _clean)
    if reply is None:
        return result.drop("solution_rejected")
    result.facts["trace"] = "chain_of_thought"
    result.records.append(_record(item, reply, "chain_of_thought"))
    return result


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    kept = [r for r in results if r.records]
    return {"kept_by_difficulty": dict(sorted(collections.Counter(r.facts["difficulty"] for r in kept).items())),
            "kept_by_trace": dict(sorted(collections.Counter(r.facts["trace"] for r in kept).items())),
            "student_correct": sum(bool(r.facts.get("student_correct")) for r in results)}
