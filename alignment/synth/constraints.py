"""Constraint types: the taxonomy (data/constraints.json), constraint sets sampled for a prompt, how each is
stated, and checks of a response against them.

A constraint is {"type": type id, "kwargs": {...}}. An IFEval-checked type's kwargs are those of its checker in
`alignment.rewards.ifeval`, a rule-checked type's those of its rule in RULES; a judged type (tone, audience,
role-play, ...) has no program that decides it, so the critic endpoint judges its `criterion`. The taxonomy
groups the types by CFBench's ten primary categories and its subcategories.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from alignment.rewards import ifeval
from alignment.synth.driver import VERDICT_FORMAT, Session

TAXONOMY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "constraints.json")
CHECKS = ("ifeval", "rule", "judge")
SEED = "$seed"  # a parameter taking the seed instruction itself (IFEval's repeat_prompt)
# How an instruction may word a relation, for the check that it states the constraint's direction.
RELATION_WORDS = {"less than": ("less than", "fewer than", "under", "below", "at most"),
                  "at least": ("at least", "or more", "minimum", "no fewer than")}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")


def _markdown_table(response: str) -> bool:
    """A header row, a separator row (|---|---|) and at least one body row, each with two or more cells."""
    lines = [line.strip() for line in response.splitlines()]
    row = lambda line: line.startswith("|") and line.endswith("|") and line.count("|") >= 3
    separator = re.compile(r"\|(\s*:?-{3,}:?\s*\|){2,}")
    return any(row(a) and separator.fullmatch(b) and row(c) for a, b, c in zip(lines, lines[1:], lines[2:]))


def _example_pattern(response: str, label: str) -> bool:
    """Two or more lines 'Label 1: ...', 'Label 2: ...', numbered from 1 without gaps."""
    numbers = [int(n) for n in re.findall(rf"^\s*{re.escape(label)} (\d+):", response, re.MULTILINE)]
    return len(numbers) >= 2 and numbers == list(range(1, len(numbers) + 1))


def _start_word(response: str, word: str) -> bool:
    match = re.match(r"\W*([^\W\d_]+)", response)
    return bool(match) and match.group(1).lower() == word.lower()


RULES = {
    "markdown_table": _markdown_table,
    "example_pattern": _example_pattern,
    "start_word": _start_word,
    "max_characters": lambda response, max_chars: len(response) < max_chars,
    "no_questions": lambda response: "?" not in response,
    "no_contractions": lambda response: not re.search(r"\b[^\W\d_]+['’](t|re|ve|ll|d|m)\b", response, re.IGNORECASE),
    "example_phrase": lambda response: "for example" in response.lower(),
    "no_title": lambda response: not ifeval.title(response),
}


@dataclasses.dataclass(frozen=True)
class ConstraintType:
    id: str
    category: str  # CFBench primary category
    subcategory: str
    check: str  # ifeval | rule | judge
    checker: str  # the IFEval instruction id or the rule name ('' for judged types)
    text: str  # how an instruction states it, {param} filled in
    params: dict  # {name: [choices]}
    cues: tuple[str, ...]  # an instruction stating it contains one of these (case-insensitive)
    conflicts: frozenset  # type ids it cannot be combined with
    criterion: str = ""  # judged types: what the critic is asked, {param} filled in


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    types: dict  # {id: ConstraintType}

    def conflict(self, a: str, b: str) -> bool:
        return a == b or b in self.types[a].conflicts or a in self.types[b].conflicts


def _check_type(entry: dict, where: str, ids: set) -> ConstraintType:
    fields = ("id", "category", "subcategory", "check", "checker", "text", "params", "cues", "conflicts")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    if entry["check"] not in CHECKS:
        raise ValueError(f"{where}: check {entry['check']!r} is not one of {list(CHECKS)}")
    known = {"ifeval": ifeval.INSTRUCTIONS, "rule": RULES, "judge": {"": None}}[entry["check"]]
    if entry["checker"] not in known:
        raise ValueError(f"{where}: checker {entry['checker']!r} is not a {entry['check']} checker")
    if entry["check"] == "judge" and not entry.get("criterion"):
        raise ValueError(f"{where}: a judged type needs a 'criterion' for the critic")
    params = entry["params"]
    if not isinstance(params, dict) or any(not isinstance(v, list) or not v for v in params.values()):
        raise ValueError(f"{where}: params must map each name to a non-empty list of choices")
    named = set(re.findall(r"\{(\w+)\}", entry["text"] + entry.get("criterion", "")))
    if named - set(params):
        raise ValueError(f"{where}: the text names {sorted(named - set(params))}, which are not params")
    unknown = set(entry["conflicts"]) - ids
    if unknown:
        raise ValueError(f"{where}: conflicts with unknown type(s) {sorted(unknown)}")
    return ConstraintType(entry["id"], entry["category"], entry["subcategory"], entry["check"], entry["checker"],
                          entry["text"], params, tuple(c.lower() for c in entry["cues"]),
                          frozenset(entry["conflicts"]), entry.get("criterion", ""))


def load_taxonomy(path: str = TAXONOMY_PATH) -> Taxonomy:
    """The constraint types of a taxonomy file ({"types": [...]}); errors name the file and the entry."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["types"]
    except FileNotFoundError:
        raise FileNotFoundError(f"constraint taxonomy not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a taxonomy file ({{\"types\": [...]}}): {e}") from None
    ids = [e.get("id") for e in entries if isinstance(e, dict)]
    duplicates = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if len(ids) != len(entries) or duplicates:
        raise ValueError(f"{path}: every type needs a unique 'id' (duplicates: {duplicates})")
    return Taxonomy({e["id"]: _check_type(e, f"{path}: type {e['id']!r}", set(ids)) for e in entries})


# --- stating constraints -----------------------------------------------------------------------------------------

def display(value) -> str:
    """How a parameter value reads in an instruction: a keyword list as '"a" and "b"', a {value, text} as its text."""
    if isinstance(value, dict):
        return str(value["text"])
    if isinstance(value, list):
        quoted = [f'"{v}"' for v in value]
        return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return str(value)


def kwarg_value(value, seed_prompt: str):
    if isinstance(value, dict):
        return value["value"]
    return seed_prompt if value == SEED else value


def _shown(kind: ConstraintType, name: str, value) -> str:
    """The display text of a kwarg value: its choice's text when it is one of the choices."""
    for choice in kind.params.get(name, ()):
        if isinstance(choice, dict) and choice["value"] == value:
            return str(choice["text"])
    return display(value)


def state(taxonomy: Taxonomy, constraint: dict) -> str:
    """The sentence stating the constraint."""
    kind = taxonomy.types[constraint["type"]]
    return kind.text.format(**{k: _shown(kind, k, v) for k, v in constraint["kwargs"].items()})


def criterion(taxonomy: Taxonomy, constraint: dict) -> str:
    """What the critic is asked about a judged constraint."""
    kind = taxonomy.types[constraint["type"]]
    return kind.criterion.format(**{k: _shown(kind, k, v) for k, v in constraint["kwargs"].items()})


def pattern(kind: ConstraintType, template: str) -> re.Pattern:
    """A type's text (or criterion) template as a regex: each {param} an alternation of its choices as shown."""
    parts = re.split(r"\{(\w+)\}", template)
    regex, named = "", set()
    for index, part in enumerate(parts):
        if index % 2 == 0:
            regex += re.escape(part)
        elif part in named:  # stated twice: the same value both times
            regex += f"(?P={part})"
        else:
            named.add(part)
            shown = sorted({display(c) for c in kind.params[part]}, key=len, reverse=True)
            regex += f"(?P<{part}>" + "|".join(re.escape(s) for s in shown) + ")"
    return re.compile(regex)


def find_stated(taxonomy: Taxonomy, instruction: str) -> tuple[str, list[dict]]:
    """(the text before the first constraint, the constraints the text states in the taxonomy's own wording): how
    a system message or an instruction built from the taxonomy is read back."""
    found, first = [], len(instruction)
    for kind in taxonomy.types.values():
        match = pattern(kind, kind.text).search(instruction)
        if not match:
            continue
        first = min(first, match.start())
        kwargs = {}
        for name, choices in kind.params.items():
            stated = match.groupdict().get(name)
            chosen = next((c for c in choices if stated is None or display(c) == stated), choices[0])
            kwargs[name] = chosen
        found.append((match.start(), kind.id, kwargs))
    request = instruction[:first].strip()
    parsed = [{"type": type_id, "kwargs": {k: kwarg_value(v, request) for k, v in kwargs.items()}}
              for _, type_id, kwargs in sorted(found)]
    return request, parsed


def sample(taxonomy: Taxonomy, rng: np.random.Generator, count: int, usage: collections.Counter,
           checks: Sequence[str] = CHECKS, seed_prompt: str = "") -> list[dict]:
    """Up to `count` constraints of mutually compatible types, the least used types (in `usage`, which is updated)
    first so a run covers the taxonomy evenly; parameters drawn from each type's choices."""
    candidates = [t for t in taxonomy.types.values() if t.check in checks]
    order = sorted(candidates, key=lambda t: (usage[t.id], rng.random()))
    chosen: list[ConstraintType] = []
    for kind in order:
        if len(chosen) == count:
            break
        if not any(taxonomy.conflict(kind.id, c.id) for c in chosen):
            chosen.append(kind)
    usage.update(c.id for c in chosen)
    return [{"type": c.id, "kwargs": {name: kwarg_value(choices[int(rng.integers(len(choices)))], seed_prompt)
                                      for name, choices in c.params.items()}} for c in chosen]


# --- checking ----------------------------------------------------------------------------------------------------

def check(taxonomy: Taxonomy, constraint: dict, response: str) -> bool | None:
    """Whether the response meets the constraint; None for a judged type (the critic decides it)."""
    kind = taxonomy.types[constraint["type"]]
    if kind.check == "ifeval":
        return ifeval.check_instruction(response, kind.checker, constraint["kwargs"])
    if kind.check == "rule":
        return bool(response.strip()) and bool(RULES[kind.checker](response, **constraint["kwargs"]))
    return None


def failure_name(taxonomy: Taxonomy, constraint: dict) -> str:
    """The failing checker as rejection counts name it: 'ifeval:<instruction id>', 'rule:<rule>', 'judge:<type>'."""
    kind = taxonomy.types[constraint["type"]]
    return f"{kind.check}:{kind.checker or kind.id}"


def _states_value(instruction: str, name: str, value, shown: str) -> bool:
    text = instruction.lower()
    if name.endswith("relation"):
        return any(w in text for w in RELATION_WORDS.get(value, (value,)))
    if isinstance(value, bool) or value == "" or name == "prompt_to_repeat":
        return True
    if isinstance(value, int) and 0 <= value < len(_NUMBER_WORDS):
        return bool(re.search(rf"(?<!\d){value}(?!\d)|\b{_NUMBER_WORDS[value]}\b", text))
    if isinstance(value, list):
        return all(str(v).lower() in text for v in value)
    return shown.lower() in text


def unstated(taxonomy: Taxonomy, instruction: str, constraints: Iterable[dict]) -> list[str]:
    """Type ids of the constraints the instruction does not state: none of the type's cues, or a parameter value
    (number, keyword, phrase, relation) missing. A parameter with one choice is implied by the type's wording."""
    lowered, missing = instruction.lower(), []
    for constraint in constraints:
        kind = taxonomy.types[constraint["type"]]
        stated = any(cue in lowered for cue in kind.cues) and all(
            _states_value(instruction, name, value, _shown(kind, name, value))
            for name, value in constraint["kwargs"].items() if len(kind.params.get(name, ())) != 1)
        if not stated:
            missing.append(kind.id)
    return missing


def conflicts(taxonomy: Taxonomy, constraints: Sequence[dict]) -> list[tuple[str, str]]:
    """Pairs of constraint types that cannot hold together."""
    types = [c["type"] for c in constraints]
    return [(a, b) for i, a in enumerate(types) for b in types[i + 1:] if taxonomy.conflict(a, b)]


def ifeval_fields(taxonomy: Taxonomy, constraints: Iterable[dict]) -> dict:
    """{"instruction_id_list", "kwargs"} of the IFEval-checked constraints: the fields the eval stage's ifeval
    benchmark and the `ifeval` reward read."""
    chosen = [c for c in constraints if taxonomy.types[c["type"]].check == "ifeval"]
    return {"instruction_id_list": [taxonomy.types[c["type"]].checker for c in chosen],
            "kwargs": [dict(c["kwargs"]) for c in chosen]}


def coverage(taxonomy: Taxonomy, constraint_sets: Sequence[Sequence[dict]], sample_size: int, seed: int) -> dict:
    """The share of taxonomy types present in a random sample of `sample_size` constraint sets (the report
    measures ~90% on its sample), and the types the sample missed."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(constraint_sets))[:sample_size]
    seen = {c["type"] for i in picked for c in constraint_sets[i]}
    return {"sample": int(len(picked)), "types": len(taxonomy.types),
            "covered": len(seen), "coverage": len(seen) / len(taxonomy.types),
            "missed": sorted(set(taxonomy.types) - seen)}


# --- judging the constraints no program decides -------------------------------------------------------------------

CRITERIA_SYSTEM = ("You check a response against numbered criteria. Reject it when any criterion is not met, naming "
                   "each unmet criterion by its number in failures. " + VERDICT_FORMAT)


def criteria_messages(instruction: str, response: str, criteria: Sequence[str]) -> list[dict]:
    listed = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(criteria))
    return [{"role": "system", "content": CRITERIA_SYSTEM},
            {"role": "user", "content": f"Instruction:\n{instruction}\n\nResponse:\n{response}\n\nCriteria:\n{listed}"}]


def program_failures(taxonomy: Taxonomy, constraints: Sequence[dict], response: str) -> list[str]:
    """The failing checker of every constraint a program decides (IFEval checkers and rules)."""
    return [failure_name(taxonomy, c) for c in constraints if check(taxonomy, c, response) is False]


def response_failures(taxonomy: Taxonomy, session: Session, instruction: str, response: str,
                      constraints: Sequence[dict], salt) -> list[str]:
    """Every failed check of a response: programs first (on the main thread: langdetect and Punkt keep global state),
    then, when they all pass, the critic on the judged constraints (an unmet criterion k is named by its type)."""
    failures = session.on_main(program_failures, taxonomy, constraints, response)
    judged = [c for c in constraints if taxonomy.types[c["type"]].check == "judge"]
    if failures or not judged:
        return failures
    named = session.verdict(criteria_messages(instruction, response, [criterion(taxonomy, c) for c in judged]), salt)
    by_number = {str(i + 1): failure_name(taxonomy, c) for i, c in enumerate(judged)}
    return [by_number.get(re.sub(r"\D", "", name.removeprefix("critic:")), name) for name in named]
