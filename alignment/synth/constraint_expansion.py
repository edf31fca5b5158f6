"""Recipe 2 (report 4.1b): raise the complexity of seed instructions by adding constraints.

For each seed instruction a set of compatible constraint types is drawn from the taxonomy (least-used types first,
so a run covers it), the teacher rewrites the seed into one instruction stating them all, and a separate validator
keeps the instruction only if every constraint is stated (its cue and every parameter value), the seed's request
survives, and the critic finds it reasonable. The teacher then answers it; a response is kept only when every
constraint holds: IFEval checkers and rules decide theirs, the critic judges the rest (tone, audience, ...).
Records carry `instruction_id_list` / `kwargs` for the IFEval-checked constraints (the ifeval reward and the eval
stage's ifeval benchmark read them). The report gives the taxonomy coverage of a random sample of kept items.
With `max_constraints` 0 the seeds go through unexpanded (the baseline of the demonstration).
"""
from __future__ import annotations

import collections
import functools
import re

import numpy as np

from alignment.config import Field, at_least, positive
from alignment.synth import constraints as constraints_lib
from alignment.synth import pools
from alignment.synth.driver import VERDICT_FORMAT, Result, Session, generate_verified, sft_record

NAME = "constraints"
FIELDS = {
    "num_items": positive(),
    "min_constraints": at_least(0),
    "max_constraints": at_least(0),
    "attempts": positive(),
    "expand_attempts": positive(),
    "max_instruction_words": positive(),
    "min_seed_overlap": Field(low=0, high=1),
    "coverage_sample": positive(),
}

EXPAND_SYSTEM = (
    "You make instructions harder by adding constraints. Rewrite the seed instruction into one natural instruction "
    "that keeps the seed's request and states every listed constraint exactly: keep each number, keyword and quoted "
    "phrase as given. Reply with the rewritten instruction only.")
VALIDATE_SYSTEM = (
    "You check synthesised instructions. Reject an instruction that contradicts itself, cannot be followed, asks for "
    "something unreasonable or is not one clear request. " + VERDICT_FORMAT)
RESPOND_SYSTEM = "You are a careful assistant. Answer the instruction and follow every one of its requirements exactly."


def check(options) -> None:
    if options.min_constraints > options.max_constraints:
        raise ValueError(f"config.constraints.min_constraints={options.min_constraints} is more than "
                         f"max_constraints={options.max_constraints}")
    unknown = set(_checks(options)) - set(constraints_lib.CHECKS)
    if unknown:
        raise ValueError(f"config.constraints.checks: {sorted(unknown)} not among {list(constraints_lib.CHECKS)}")


def needs_critic(options) -> bool:
    return "judge" in _checks(options)


def _checks(options) -> list[str]:
    return [c.strip() for c in options.checks.split(",") if c.strip()]


def taxonomy(options) -> constraints_lib.Taxonomy:
    return _taxonomy(options.taxonomy or constraints_lib.TAXONOMY_PATH)


@functools.lru_cache(maxsize=4)
def _taxonomy(path: str) -> constraints_lib.Taxonomy:
    return constraints_lib.load_taxonomy(path)


def expand_messages(seed: str, stated: list[str]) -> list[dict]:
    listed = "\n".join(f"- {s}" for s in stated)
    return [{"role": "system", "content": EXPAND_SYSTEM},
            {"role": "user", "content": f"Seed instruction: {seed}\nConstraints to add:\n{listed}"}]


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    """One item per seed: {id, seed, category, constraints} with the constraints drawn for it."""
    seeds = pools.seed_prompts(options.seeds, options.num_items, options.categories, seed)
    types, rng, usage = taxonomy(options), np.random.default_rng(seed), collections.Counter()
    work = []
    for record in seeds:
        count = int(rng.integers(options.min_constraints, options.max_constraints + 1))
        drawn = constraints_lib.sample(types, rng, count, usage, _checks(options), record["prompt"])
        work.append({"id": record["id"], "seed": record["prompt"], "category": record["category"],
                     "constraints": drawn})
    return work, {}


_WORD = re.compile(r"[a-z]{4,}")


def instruction_failures(types: constraints_lib.Taxonomy, seed: str, instruction: str, drawn: list[dict],
                         options) -> list[str]:
    """The validator's rules: every constraint stated, the seed's content words kept, not too long."""
    failures = [f"validator:unstated:{t}" for t in constraints_lib.unstated(types, instruction, drawn)]
    seed_words = set(_WORD.findall(seed.lower()))
    kept = seed_words & set(_WORD.findall(instruction.lower()))
    if seed_words and len(kept) < options.min_seed_overlap * len(seed_words):
        failures.append("validator:seed_request_changed")
    if len(instruction.split()) > options.max_instruction_words:
        failures.append("validator:too_long")
    return failures


def expand(item: dict, session: Session, result: Result, options, types) -> str | None:
    """The validated instruction for the item (its seed when no constraints were drawn), or None."""
    if not item["constraints"]:
        return item["seed"]
    stated = [constraints_lib.state(types, c) for c in item["constraints"]]
    for attempt in range(options.expand_attempts):
        instruction = session.ask(expand_messages(item["seed"], stated), (item["id"], "expand", attempt)).strip()
        failures = instruction_failures(types, item["seed"], instruction, item["constraints"], options)
        if not failures:
            failures = list(session.verdict([{"role": "system", "content": VALIDATE_SYSTEM},
                                             {"role": "user", "content": f"Instruction: {instruction}"}],
                                            (item["id"], "validate", attempt)))
        if not failures:
            return instruction
        result.reject(failures)
    return None


def synthesize(item: dict, session: Session, options) -> Result:
    types = taxonomy(options)
    result = Result(item["id"], facts={"types": [c["type"] for c in item["constraints"]]})
    instruction = expand(item, session, result, options, types)
    if instruction is None:
        return result.drop("instruction_rejected")
    drawn = item["constraints"]
    messages = [{"role": "system", "content": RESPOND_SYSTEM}, {"role": "user", "content": instruction}]
    verify = lambda reply: constraints_lib.response_failures(types, session, instruction, reply, drawn,
                                                              (item["id"], "judge", reply))
    response = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "respond"))
    if response is None:
        return result.drop("response_rejected")
    result.records.append(sft_record(
        item["id"], NAME, item["category"], messages[1:] + [{"role": "assistant", "content": response}],
        seed_prompt=item["seed"], constraints=drawn, **constraints_lib.ifeval_fields(types, drawn)))
    return result


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    """Coverage of the taxonomy by a random sample of the kept items, and kept constraints by CFBench category."""
    types = taxonomy(options)
    kept = [r.records[0]["constraints"] for r in results if r.records]
    by_category = collections.Counter(types.types[c["type"]].category for cs in kept for c in cs)
    return {"coverage": constraints_lib.coverage(types, kept, options.coverage_sample, seed),
            "constraints_by_category": dict(sorted(by_category.items())),
            "constraints_per_item": float(np.mean([len(cs) for cs in kept])) if kept else 0.0}
