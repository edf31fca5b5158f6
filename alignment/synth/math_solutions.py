"""Recipe 5 (report 4.2): math. Balanced sampling over difficulty levels and knowledge points (the taxonomy is data:
data/math_taxonomy.json), reference-guided step-by-step solutions, the final answer verified against the reference
with math-verify, mentions of the reference stripped, and a category-share knob for the SFT mix.

The teacher sees the problem and its reference answer, told that the reference is right with 95% probability and
is only for checking its work. A solution is kept when, after every sentence mentioning the reference is removed,
it still shows its steps and its final answer equals the reference (math-verify, on the main thread: it enforces
its timeouts with signals). With `mix_with` set (other SFT records), mixed.jsonl holds them and the math records
with math at `share` of the whole (the report: about 20%), downsampling whichever side is in excess.
"""
from __future__ import annotations

import collections
import fractions
import json
import math
import os
import re

import numpy as np

from alignment.config import Field, positive
from alignment.data.sources import read_jsonl
from alignment.rewards import math_answers
from alignment.synth import pools
from alignment.synth.driver import Result, Session, generate_verified, sft_record, write_jsonl

NAME = "math"
FIELDS = {"num_items": positive(), "attempts": positive(), "share": Field(low=0, high=1, open_low=True),
          "min_steps": positive()}
TAXONOMY_PATH = os.path.join(pools.DATA, "math_taxonomy.json")
SOLVE_SYSTEM = (
    "Solve the math problem step by step, one step per line, and end with the line 'The answer is \\boxed{...}.' "
    "A reference answer comes with the problem; it is correct with 95% probability. Use it only to check your work: "
    "solve the problem yourself, and never mention the reference or that an answer was given.")
_MENTION = re.compile(r"\b(reference|given answer|provided answer|expected answer|answer (?:was|is) (?:given|provided))"
                      r"\b", re.IGNORECASE)
_FINAL = re.compile(r"\\boxed\{|answer is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def load_taxonomy(path: str = TAXONOMY_PATH) -> dict:
    """{"levels": {level: description}, "knowledge_points": [{id, domain, name}]}, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            taxonomy = json.load(f)
        levels, points = taxonomy["levels"], taxonomy["knowledge_points"]
        ids = [p["id"] for p in points]
    except FileNotFoundError:
        raise FileNotFoundError(f"math taxonomy not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: needs 'levels' and 'knowledge_points' [{{id, domain, name}}] ({e})") from None
    if not levels or len(set(ids)) != len(ids):
        raise ValueError(f"{path}: levels must be non-empty and knowledge point ids unique")
    return taxonomy


# --- the embedded pool: one generator per knowledge point, harder with the level ---------------------------------

def _text(value: fractions.Fraction | int) -> str:
    value = fractions.Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _order_of_operations(rng, level):
    a, b, c, d, e, f = (int(x) for x in rng.integers(2, 10, 6))
    if level == 1:
        return f"Compute {a} + {b} × {c}.", a + b * c
    if level == 2:
        return f"Compute ({a} + {b}) × {c} − {d}.", (a + b) * c - d
    return f"Compute {a} × ({b} + {c}) − {d} × {e} + {f}.", a * (b + c) - d * e + f


def _fractions(rng, level):
    a, c = (int(x) for x in rng.integers(1, 9, 2))
    b, d, f = (int(x) for x in rng.integers(2, 10, 3))
    e = int(rng.integers(1, 9))
    if level == 1:
        return f"Add the fractions {a}/{b} and {c}/{b}.", fractions.Fraction(a + c, b)
    if level == 2:
        return f"Add the fractions {a}/{b} and {c}/{d}.", fractions.Fraction(a, b) + fractions.Fraction(c, d)
    return (f"Compute {a}/{b} × {c}/{d} + {e}/{f}.",
            fractions.Fraction(a, b) * fractions.Fraction(c, d) + fractions.Fraction(e, f))


def _percentages(rng, level):
    p, q = (int(rng.choice([10, 20, 25, 50])) for _ in range(2))
    n = 100 * int(rng.integers(1, 20))
    if level == 1:
        return f"What is {p}% of {n}?", fractions.Fraction(p * n, 100)
    if level == 2:
        return (f"A price of {n} dollars rises by {p}%. What is the new price in dollars?",
                n + fractions.Fraction(p * n, 100))
    after = fractions.Fraction(n) * (100 + p) / 100 * (100 - q) / 100
    return (f"A stock worth {n} dollars rises by {p}% and then falls by {q}%. What is it worth now, in dollars?",
            after)


def _linear_equations(rng, level):
    x, a, b, c = int(rng.integers(-9, 10)), int(rng.integers(2, 9)), int(rng.integers(1, 20)), int(rng.integers(1, 5))
    if level == 1:
        return f"Solve for x: x + {b} = {x + b}.", x
    if level == 2:
        return f"Solve for x: {a}x + {b} = {a * x + b}.", x
    return f"Solve for x: {a + c}x + {b} = {c}x + {a * x + b}.", x


def _ratios(rng, level):
    parts = [1, int(rng.integers(2, 6))] if level == 1 else [int(v) for v in rng.integers(1, 8, 2 if level == 2 else 3)]
    total = sum(parts) * int(rng.integers(2, 20))
    ratio = ":".join(map(str, parts))
    return (f"Share {total} sweets in the ratio {ratio}. How many sweets are in the largest share?",
            total // sum(parts) * max(parts))


def _rectangles(rng, level):
    w, h, s = int(rng.integers(2, 15)), int(rng.integers(2, 15)), int(rng.integers(1, 3))
    if level == 1:
        return f"A rectangle is {w} cm wide and {h} cm tall. What is its area in square cm?", w * h
    if level == 2:
        return f"A rectangle has area {w * h} square cm and width {w} cm. What is its perimeter in cm?", 2 * (w + h)
    return (f"A square of side {s} cm is cut from the corner of a {w + s} cm by {h + s} cm rectangle. What area "
            "is left, in square cm?", (w + s) * (h + s) - s * s)


def _gcd_lcm(rng, level):
    a, b, c = (int(x) for x in rng.integers(2, 30, 3))
    if level == 1:
        return f"What is the greatest common divisor of {a * 2} and {b * 2}?", math.gcd(a * 2, b * 2)
    if level == 2:
        return f"What is the least common multiple of {a} and {b}?", math.lcm(a, b)
    return f"What is the least common multiple of {a}, {b} and {c}?", math.lcm(a, b, c)


def _dice(rng, level):
    s = int(rng.integers(2, 13))
    rolls = [(i, j) for i in range(1, 7) for j in range(1, 7)]
    if level == 1:
        return (f"Two fair dice are rolled. What is the probability that their sum is {s}?",
                fractions.Fraction(sum(i + j == s for i, j in rolls), 36))
    if level == 2:
        return (f"Two fair dice are rolled. What is the probability that their sum is at least {s}?",
                fractions.Fraction(sum(i + j >= s for i, j in rolls), 36))
    return (f"Two fair dice are rolled. What is the probability that both show even numbers and their sum is more "
            f"than {s}?", fractions.Fraction(sum(i % 2 == 0 and j % 2 == 0 and i + j > s for i, j in rolls), 36))


def _arithmetic_sequences(rng, level):
    a, d, n = int(rng.integers(-5, 20)), int(rng.integers(2, 9)), int(rng.integers(5, 30))
    terms = ", ".join(str(a + d * i) for i in range(4))
    if level == 1:
        return f"What is the next term of the sequence {terms}, ...?", a + 4 * d
    if level == 2:
        return f"What is term number {n} of the sequence {terms}, ...?", a + (n - 1) * d
    return f"What is the sum of the first {n} terms of the sequence {terms}, ...?", n * (2 * a + (n - 1) * d) // 2


def _unit_conversion(rng, level):
    k, h, m = int(rng.integers(2, 50)), int(rng.integers(1, 10)), int(rng.integers(1, 60))
    if level == 1:
        return f"How many metres are in {k} kilometres?", 1000 * k
    if level == 2:
        return f"How many minutes are in {h} hours and {m} minutes?", 60 * h + m
    return (f"A car drives at {k * 18} km per hour. What is its speed in metres per second?",
            fractions.Fraction(k * 18 * 1000, 3600))


GENERATORS = {
    "arithmetic.order_of_operations": _order_of_operations,
    "arithmetic.fractions": _fractions,
    "arithmetic.percentages": _percentages,
    "algebra.linear_equations": _linear_equations,
    "algebra.ratios": _ratios,
    "geometry.rectangles": _rectangles,
    "number_theory.gcd_lcm": _gcd_lcm,
    "probability.dice": _dice,
    "sequences.arithmetic": _arithmetic_sequences,
    "measurement.unit_conversion": _unit_conversion,
}


def embedded_pool(taxonomy: dict, per_cell: int, seed: int) -> list[dict]:
    """`per_cell` generated problems for every (knowledge point, level) with a generator."""
    rng = np.random.default_rng(seed)
    pool = []
    for point in taxonomy["knowledge_points"]:
        for level in sorted(taxonomy["levels"], key=int):
            for _ in range(per_cell if point["id"] in GENERATORS else 0):
                problem, answer = GENERATORS[point["id"]](rng, int(level))
                pool.append({"problem": problem, "answer": _text(answer), "level": str(level),
                             "knowledge_point": point["id"]})
    return pool


def read_pool(path: str, taxonomy: dict) -> list[dict]:
    points = {p["id"] for p in taxonomy["knowledge_points"]}
    pool = []
    for number, record in read_jsonl(path):
        missing = [k for k in ("problem", "answer", "level", "knowledge_point") if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {missing}")
        if record["knowledge_point"] not in points or str(record["level"]) not in taxonomy["levels"]:
            raise ValueError(f"{path}:{number}: knowledge_point {record['knowledge_point']!r} or level "
                             f"{record['level']!r} is not in the math taxonomy")
        pool.append({**record, "level": str(record["level"]), "answer": str(record["answer"])})
    return pool


def balanced(pool: list[dict], num: int, seed: int) -> tuple[list[dict], dict]:
    """About `num` problems, the same number from every (knowledge point, level) cell (all of a cell that has
    fewer); duplicates and the cells' excess are counted, as are the cells that fell short."""
    unique = list({p["problem"]: p for p in pool}.values())
    cells = collections.defaultdict(list)
    for problem in unique:
        cells[(problem["knowledge_point"], problem["level"])].append(problem)
    quota = -(-num // max(len(cells), 1))
    rng, chosen = np.random.default_rng(seed), []
    for key in sorted(cells):
        members = cells[key]
        chosen += [members[i] for i in sorted(rng.permutation(len(members))[:quota])]
    short = sum(len(m) < quota for m in cells.values())
    return chosen, {"duplicate": len(pool) - len(unique), "over_quota": len(unique) - len(chosen),
                    **({"cells_short_of_quota": short} if short else {})}


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    taxonomy = load_taxonomy(options.taxonomy or TAXONOMY_PATH)
    cells = len(taxonomy["levels"]) * len(taxonomy["knowledge_points"])
    if options.problems == pools.EMBEDDED:
        pool = embedded_pool(taxonomy, 2 * -(-options.num_items // cells), seed)
    else:
        pool = read_pool(options.problems, taxonomy)
    chosen, filtered = balanced(pool, options.num_items, seed)
    return [{**p, "id": f"math-{i}"} for i, p in enumerate(chosen)], filtered


def strip_reference(text: str) -> tuple[str, int]:
    """The text without the sentences that mention the reference answer, and how many were removed."""
    removed, lines = 0, []
    for line in text.splitlines():
        sentences = _SENTENCE_END.split(line)
        kept = [s for s in sentences if not _MENTION.search(s)]
        removed += len(sentences) - len(kept)
        if kept or not line.strip():
            lines.append(" ".join(kept))
    return "\n".join(lines).strip(), removed


def _equivalent(solution: str, reference: str) -> str:
    try:
        return "equal" if math_answers.math_equivalent(solution, reference) else "different"
    except ValueError:
        return "unparseable_reference"


def solution_failures(reply: str, reference: str, min_steps: int, session: Session) -> list[str]:
    solution, _ = strip_reference(reply)
    steps = [line for line in solution.splitlines() if line.strip() and not _FINAL.search(line)]
    failures = ["math:no_steps"] if len(steps) < min_steps else []
    if not _FINAL.search(solution):
        return failures + ["math:no_final_answer"]
    status = session.on_main(_equivalent, solution, reference)
    if status != "equal":
        failures.append("math:wrong_final_answer" if status == "different" else f"math:{status}")
    return failures


def synthesize(item: dict, session: Session, options) -> Result:
    result = Result(item["id"], facts={"cell": (item["knowledge_point"], item["level"])})
    messages = [{"role": "system", "content": SOLVE_SYSTEM},
                {"role": "user", "content": f"Problem: {item['problem']}\nReference answer: {item['answer']}"}]
    verify = lambda reply: solution_failures(reply, item["answer"], options.min_steps, session)  # noqa: E731
    shown, stripped = [{"role": "user", "content": item["problem"]}], []

    def clean(reply: str) -> str:
        text, removed = strip_reference(reply)
        stripped.append(removed)
        return text

    solution = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "solve"), shown,
                                 clean)
    if solution is None:
        return result.drop("solution_rejected")
    result.facts["mentions_stripped"] = stripped[-1]
    result.records.append(sft_record(item["id"], NAME, "math", shown + [{"role": "assistant", "content": solution}],
                                     answer=item["answer"], level=item["level"],
                                     knowledge_point=item["knowledge_point"]))
    return result


def mix(math_records: list[dict], others: list[dict], share: float, seed: int) -> tuple[list[dict], dict]:
    """Math and other records with math at `share` of the whole, the side in excess downsampled (seeded)."""
    rng = np.random.default_rng(seed)
    if not others or not math_records:
        return math_records + others, {"math": len(math_records), "other": len(others)}
    num_math = min(len(math_records), round(share / (1 - share) * len(others)) if share < 1 else len(math_records))
    num_other = min(len(others), round((1 - share) / share * num_math))
    pick = lambda records, n: [records[i] for i in sorted(rng.permutation(len(records))[:n])]  # noqa: E731
    mixed = pick(math_records, num_math) + pick(others, num_other)
    order = rng.permutation(len(mixed))
    return [mixed[i] for i in order], {"math": num_math, "other": num_other,
                                       "math_share": num_math / max(num_math + num_other, 1),
                                       "math_dropped": len(math_records) - num_math,
                                       "other_dropped": len(others) - num_other}


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    kept = [r for r in results if r.records]
    report = {"kept_by_level": dict(sorted(collections.Counter(r.facts["cell"][1] for r in kept).items())),
              "kept_by_knowledge_point": dict(sorted(collections.Counter(r.facts["cell"][0] for r in kept).items())),
              "reference_mentions_stripped": sum(r.facts.get("mentions_stripped", 0) for r in kept)}
    paths = [p.strip() for p in options.mix_with.split(",") if p.strip()]
    if paths:
        others = [record for path in paths for _, record in read_jsonl(path)]
        mixed, report["mix"] = mix([record for r in kept for record in r.records], others, options.share, seed)
        write_jsonl(os.path.join(workdir, "mixed.jsonl"), mixed)
    return report
