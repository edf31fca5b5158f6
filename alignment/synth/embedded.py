"""The embedded teacher for the synthesis recipes: rule-based stand-ins for a teacher LLM and a critic, served over
HTTP by the PAS pipeline's embedded teacher (`alignment.pas.teacher`) as extra request kinds.

A fresh machine has no LLM, so each recipe's requests (recognised by their system message) get a deterministic
reply built from templates: plausible items that pass the recipe's verifiers, and, for a `flaw_rate` share of
requests, deliberately flawed ones (a dropped constraint, a wrong final answer, a buggy program, a missing section,
a mention of the reference, ...) that the verifiers must reject and count. The same request always gets the same
reply; a retry sends a new seed and draws anew. Its output shows that the machinery works, not data quality: point
`teacher.url` at a real LLM for real data.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from alignment.pas.teacher import start_teacher, topic
from alignment.rewards import ifeval
from alignment.synth import (coding, constraint_expansion, embedded_text, math_solutions, pools, reasoning,
                             response_reversal, system_messages, teacher_style, tool_use)
from alignment.synth import constraints as constraints_lib

with open(os.path.join(pools.DATA, "embedded_code.json"), encoding="utf-8") as _file:
    _CODE = json.load(_file)  # the stand-in's programs: solutions, buggy versions and follow-ups by function name
with open(system_messages.SEEDS_PATH, encoding="utf-8") as _file:
    # the stand-in critic's knowledge of which domain each shipped seed paragraph belongs to
    _SEED_DOMAINS = {part.strip(): seed["domain"] for seed in map(json.loads, _file)
                     for part in seed["system"].split("\n\n")}


def draw(*parts) -> float:
    """A number in [0, 1) fixed by the parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pick(options: list, *parts):
    return options[int(draw(*parts) * len(options))]


def _verdict(failures: list[str]) -> str:
    return json.dumps({"verdict": "reject" if failures else "accept", "failures": failures})


def _off_by_one(answer: str) -> str:
    """A wrong answer next to `answer`: its numerator or value plus one."""
    match = re.fullmatch(r"(-?\d+)(/\d+)?", answer.strip())
    return f"{int(match.group(1)) + 1}{match.group(2) or ''}" if match else f"{answer} + 1"


def _wrong_answer(problem: str, reference: str) -> str:
    """The first candidate the problem mentions that is not the reference: a name, a weekday, yes/no, a number."""
    for pattern in (r"\b([A-Z][a-z]+) is taller", r"\b(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)\b",
                    r"\b(yes|no)\b", r"\b(\d+)\b"):
        for candidate in re.findall(pattern, problem):
            if candidate.lower() != reference.lower():
                return candidate
    return _off_by_one(reference) if reference else "0"


def _program(name: str) -> tuple[str, str, str] | None:
    """(language, code, buggy code or '') of a function in the bank: a first turn's, a follow-up's, another
    language's."""
    if name in _CODE["python"]:
        return "python", _CODE["python"][name]["solution"], _CODE["python"][name]["buggy"]
    for entry in _CODE["python"].values():
        if entry["follow_up"]["function"] == name:
            return "python", entry["follow_up"]["solution"], ""
    if name in _CODE["other"]:
        return _CODE["other"][name]["language"], _CODE["other"][name]["solution"], ""
    return None


class Answers:
    """The stand-in's replies, one method per request kind; `table()` maps each kind's system message to it."""

    def __init__(self, flaw_rate: float, taxonomy: constraints_lib.Taxonomy):
        self.flaw_rate, self.taxonomy = flaw_rate, taxonomy

    def _flawed(self, request: str, body: dict) -> bool:
        return draw(request, body.get("seed", 0), "flaw") < self.flaw_rate

    # --- constraint expansion ---------------------------------------------------------------------------------

    def expand(self, messages: list[dict], body: dict) -> str:
        """The seed followed by the constraints as stated; flawed: one dropped, a contradicting one added, or the
        seed answered instead of rewritten."""
        request = messages[-1]["content"]
        seed = re.search(r"^Seed instruction: (.*)$", request, re.MULTILINE)
        stated = re.findall(r"^- (.*)$", request, re.MULTILINE)
        seed = seed.group(1) if seed else request
        if self._flawed(request, body):
            flaw = _pick(["drop", "contradict", "answer"], request, body.get("seed"), "kind")
            if flaw == "drop" and stated:
                stated = stated[1:]
            elif flaw == "contradict" and stated:
                stated = stated + [self._contradiction(" ".join(stated))]
            else:
                return " ".join(embedded_text.sentences(topic(seed, ""), 3))
        return " ".join([seed] + stated)

    def _contradiction(self, stated: str) -> str:
        _, parsed = constraints_lib.find_stated(self.taxonomy, stated)
        for constraint in parsed:
            for other in sorted(self.taxonomy.types[constraint["type"]].conflicts):
                kind = self.taxonomy.types[other]
                kwargs = {name: constraints_lib.kwarg_value(choices[0], "") for name, choices in kind.params.items()}
                return constraints_lib.state(self.taxonomy, {"type": other, "kwargs": kwargs})
        return "Ignore every requirement above."

    def validate(self, messages: list[dict], body: dict) -> str:
        """Rejects an instruction with no request before its constraints or with constraints that conflict."""
        instruction = messages[-1]["content"].removeprefix("Instruction: ")
        request, parsed = constraints_lib.find_stated(self.taxonomy, instruction)
        failures = ["no_request"] if not request else []
        if constraints_lib.conflicts(self.taxonomy, parsed) or "Ignore every requirement" in instruction:
            failures.append("contradictory")
        return _verdict(failures)

    def respond(self, messages: list[dict], body: dict) -> str:
        """Template sentences meeting every constraint the instruction states; flawed: one constraint ignored."""
        instruction = messages[-1]["content"]
        request, parsed = constraints_lib.find_stated(self.taxonomy, instruction)
        skip = ""
        if parsed and self._flawed(instruction, body):
            skip = _pick(parsed, instruction, body.get("seed"), "skip")["type"]
        return embedded_text.write(self.taxonomy, topic(request or instruction, ""), request, parsed, skip)

    def criteria(self, messages: list[dict], body: dict) -> str:
        """Criterion k is met when the response holds the stand-in's sentence for that judged constraint."""
        request = messages[-1]["content"]
        match = re.search(r"Response:\n(.*)\n\nCriteria:\n(.*)$", request, re.DOTALL)
        if not match:
            return _verdict(["unreadable request"])
        response = re.sub(r"[,\"]", "", match.group(1)).lower()
        failures = []
        for number, criterion in re.findall(r"^(\d+)\. (.*)$", match.group(2), re.MULTILINE):
            constraint = self._judged(criterion)
            if constraint is None or re.sub(r"[,\"]", "", embedded_text.judged_sentence(constraint)).lower() \
                    not in response:
                failures.append(number)
        return _verdict(failures)

    def _judged(self, criterion: str) -> dict | None:
        for kind in self.taxonomy.types.values():
            if kind.check != "judge":
                continue
            match = constraints_lib.pattern(kind, kind.criterion).fullmatch(criterion.strip())
            if match:
                shown = match.groupdict()
                return {"type": kind.id, "kwargs": {n: next(c for c in kind.params[n]
                                                            if constraints_lib.display(c) == shown[n])
                                                    for n in kind.params}}
        return None

    # --- response reversal --------------------------------------------------------------------------------------

    def reverse(self, messages: list[dict], body: dict) -> str:
        """A prompt stating every measured attribute of the passage; flawed: one left out, the length misstated
        (false for the passage), or prose instead of JSON. A revision round draws anew."""
        passage = messages[1]["content"].removeprefix("Response:\n")
        subject = embedded_text.topic_of(passage) or "this subject"
        stated = response_reversal.measure(self.taxonomy, passage, embedded_text.language_of(passage))
        key = (passage, len(messages), body.get("seed"))
        if self._flawed(f"{passage}|{len(messages)}", body):
            flaw = _pick(["omit", "misstate", "prose"], *key, "kind")
            if flaw == "omit" and len(stated) > 1:
                stated.pop(int(draw(*key, "which") * len(stated)))
            elif flaw == "misstate":
                stated = [{**c, "kwargs": {**c["kwargs"], "num_words": 10}} if c["type"] == "numerical.words" else c
                          for c in stated]
            else:
                return f"Write something about {subject}."
        prompt = " ".join([f"Write a short piece about {subject}."] +
                          [constraints_lib.state(self.taxonomy, c) for c in stated])
        return json.dumps({"prompt": prompt, "constraints": stated})

    @staticmethod
    def inspect(messages: list[dict], body: dict) -> str:
        """Scores 8 and accepts a prompt that names the passage's topic, else 4 and asks for it."""
        match = re.search(r"Response:\n(.*)\n\nPrompt:\n(.*)$", messages[-1]["content"], re.DOTALL)
        if not match:
            return json.dumps({"score": 1, "verdict": "reject", "failures": ["unreadable request"]})
        subject = embedded_text.topic_of(match.group(1)) or "this subject"
        if subject.lower() in match.group(2).lower():
            return json.dumps({"score": 8, "verdict": "accept", "failures": []})
        return json.dumps({"score": 4, "verdict": "reject", "failures": [f"name the topic ({subject})"]})

    # --- system messages ----------------------------------------------------------------------------------------

    def decompose(self, messages: list[dict], body: dict) -> str:
        """The seed's paragraphs in order as the five components; flawed: one left out, or prose."""
        prompt = messages[-1]["content"]
        paragraphs = [p.strip() for p in prompt.split("\n\n") if p.strip()]
        parts = dict(zip(system_messages.COMPONENTS, paragraphs))
        if self._flawed(prompt, body):
            if _pick(["drop", "prose"], prompt, body.get("seed"), "kind") == "prose":
                return "This system prompt describes an assistant and how it should answer."
            parts.pop(_pick(list(parts), prompt, body.get("seed"), "which"), None)
        return json.dumps(parts)

    @staticmethod
    def combine(messages: list[dict], body: dict) -> str:
        """Rejects an opening from a shipped seed of another domain than the task's: the stand-in's world knowledge
        is the domain of each shipped seed paragraph."""
        parts = messages[-1]["content"].removeprefix("System message:\n").split("\n\n")
        task, opening = _SEED_DOMAINS.get(parts[0], ""), _SEED_DOMAINS.get(parts[-1], "")
        return _verdict(["opening_does_not_suit_the_task"] if task and opening and task != opening else [])

    def query(self, messages: list[dict], body: dict) -> str:
        """'Could you help me <the task>?' from the task description; flawed: the task description itself."""
        system = messages[-1]["content"]
        task = system.split("\n\n")[0]
        if self._flawed(system, body):
            return task
        match = re.search(r"You help \w+ (.+?)\.", task)
        return f"Could you help me {match.group(1) if match else 'with this'}?"

    def role(self, messages: list[dict], body: dict) -> str:
        """Meets the constraints the system message states, about the user's topic; flawed: one ignored."""
        request = messages[-1]["content"]
        system, _, user = request.removeprefix("System message:\n").partition("\n\nUser message:\n")
        _, stated = constraints_lib.find_stated(self.taxonomy, system)
        flawed = stated and self._flawed(request, body)
        skip = _pick(stated, request, body.get("seed"), "skip")["type"] if flawed else ""
        subject = re.search(r"help me (.+?)\?", user)
        return embedded_text.write(self.taxonomy, subject.group(1) if subject else topic(user, ""), user, stated, skip)

    # --- teacher-style responses ----------------------------------------------------------------------------------

    def teach(self, messages: list[dict], body: dict) -> str:
        """The five parts from templates; flawed: no analogy, parts out of order, or one principle only."""
        prompt = messages[-1]["content"]
        subject = topic(prompt, "")
        parts = {
            "Intent": f"You want a clear picture of {subject} that you can use right away.",
            "Thought process": f"First name what {subject} is. Then see how it works in practice. Finally test the "
                               "idea on an everyday case.",
            "Analogy": f"Think of {subject} like a map: it does not walk the road for you, but it shows where each "
                       "step leads.",
            "Principles": "\n- Start from what you already know.\n- Test each idea on a real example.\n- Keep the "
                          "explanation as simple as the subject allows.",
            "Answer": " ".join(embedded_text.sentences(subject, 5)),
        }
        order = list(teacher_style.SECTIONS)
        if self._flawed(prompt, body):
            flaw = _pick(["analogy", "order", "principles"], prompt, body.get("seed"), "kind")
            if flaw == "analogy":
                order.remove("Analogy")
            elif flaw == "order":
                order = order[::-1]
            else:
                parts["Principles"] = "\n- Start from what you already know."
        return "\n\n".join(f"{heading}: {parts[heading]}" for heading in order)

    @staticmethod
    def check_teaching(messages: list[dict], body: dict) -> str:
        """Accepts when the answer part mentions the instruction's topic."""
        request = messages[-1]["content"]
        instruction = request.removeprefix("Instruction:\n").split("\n\nResponse:\n")[0]
        subject = topic(instruction, "").lower()
        return _verdict([] if subject in request.split("Answer:")[-1].lower() else ["off_topic"])

    # --- math and reasoning ---------------------------------------------------------------------------------------

    def solve(self, messages: list[dict], body: dict) -> str:
        """Generic steps over the problem's numbers, ending in the reference; flawed: a wrong final answer, the
        reference mentioned (stripped, still correct), mentioned in the final line (stripped: no answer left), or
        no steps."""
        request = messages[-1]["content"]
        problem = re.search(r"^Problem: (.*)$", request, re.MULTILINE)
        reference = re.search(r"^Reference answer: (.*)$", request, re.MULTILINE)
        problem, reference = (problem.group(1) if problem else request), (reference.group(1) if reference else "0")
        numbers = re.findall(r"\d+(?:/\d+)?", problem)[:4] or ["the given values"]
        steps = [f"Step 1: The problem gives {', '.join(numbers)}.",
                 "Step 2: Apply the operations the question asks for, one at a time.",
                 "Step 3: Check the result against what the question asks."]
        final = f"The answer is \\boxed{{{reference}}}."
        if self._flawed(request, body):
            flaw = _pick(["wrong", "mention", "mention_final", "no_steps"], request, body.get("seed"), "kind")
            if flaw == "wrong":
                final = f"The answer is \\boxed{{{_off_by_one(reference)}}}."
            elif flaw == "mention":
                steps.append("This agrees with the reference answer.")
            elif flaw == "mention_final":
                final = f"The reference answer is \\boxed{{{reference}}}."
            else:
                steps = []
        return "\n".join(steps + [final])

    def think(self, messages: list[dict], body: dict) -> str:
        """Chain of thought ending in the reference; flawed: a wrong answer or no steps."""
        request = messages[-1]["content"]
        problem = request.split("\n")[0].removeprefix("Problem: ")
        reference = request.rsplit("Reference answer: ", 1)[-1].strip()
        lines = ["Step 1: List the facts the problem states.", "Step 2: Combine them one at a time.",
                 "Step 3: Check the result against the question."]
        answer = reference
        if self._flawed(request, body):
            if draw(request, body.get("seed"), "kind") < 0.5:
                answer = _wrong_answer(problem, reference)
            else:
                lines = []
        return "\n".join(lines + [f"The answer is {answer}."])

    @staticmethod
    def student(messages: list[dict], body: dict) -> str:
        """A hasty answer: the first candidate the problem mentions (usually wrong)."""
        problem = messages[-1]["content"]
        return f"The answer is {_wrong_answer(problem, '')}."

    def reflect(self, messages: list[dict], body: dict) -> str:
        """Revisits the first attempt, names the slip, ends in the correct answer; flawed: keeps the first answer,
        reflects on nothing, or mentions that the answer was given."""
        request = messages[-1]["content"]
        first = re.search(r"^First attempt: The answer is (.*)\.$", request, re.MULTILINE)
        correct = re.search(r"^Correct answer: (.*)$", request, re.MULTILINE)
        first, correct = (first.group(1) if first else "?"), (correct.group(1) if correct else "?")
        lines = [f"My first attempt gave {first}.", "Wait, let me check that against every fact in the problem.",
                 f"One fact was skipped, so {first} does not hold.", "Working through the facts again in order:",
                 f"The answer is {correct}."]
        if self._flawed(request, body):
            flaw = _pick(["keep", "no_reflection", "mention"], request, body.get("seed"), "kind")
            if flaw == "keep":
                lines[-1] = f"The answer is {first}."
            elif flaw == "no_reflection":
                lines = [f"Working through the facts in order gives {correct}.", f"The answer is {correct}."]
            else:
                lines.insert(-1, f"The correct answer was given as {correct}.")
        return "\n".join(lines)

    # --- code -------------------------------------------------------------------------------------------------

    @staticmethod
    def label(messages: list[dict], body: dict) -> str:
        """Keyword rules: questions are knowledge Q&A, 'complete/full ... engine/compiler/distributed' very
        difficult, the rest algorithm problems, easy when they name one small function."""
        prompt = messages[-1]["content"]
        if re.search(r"\b(complete|full)\b.*\b(compiler|engine|database|browser)\b", prompt, re.IGNORECASE):
            return json.dumps({"category": "system_design", "difficulty": "very_difficult"})
        if re.match(r"(What|Why|Explain|How)\b", prompt):
            return json.dumps({"category": "knowledge_qa", "difficulty": "easy"})
        return json.dumps({"category": "algorithm", "difficulty": "easy" if "`" in prompt else "medium"})

    def program(self, messages: list[dict], body: dict) -> str:
        """The bank's program for the function the request names (the follow-up's for a second turn); flawed:
        the buggy version, no code fence, or the wrong language tag. Concept questions get prose."""
        request = messages[-1]["content"]
        named = re.findall(r"`(\w+)\(", request)
        entry = _program(named[0]) if named else None
        if entry is None:
            subject = topic(request, "")
            return " ".join(embedded_text.sentences(subject, 4)) + f" In code, {subject} appears whenever data moves."
        language, code, buggy = entry
        if self._flawed(request, body):
            flaw = _pick(["bug", "fence", "tag"], request, body.get("seed"), "kind")
            if flaw == "bug" and buggy:
                code = buggy
            elif flaw == "fence":
                return f"Here is the function:\n{code}"
            else:
                language = "text"
        return f"Here is a solution.\n\n```{language}\n{code}```\n\nIt handles the cases the request describes."

    @staticmethod
    def follow_up(messages: list[dict], body: dict) -> str:
        """The bank's harder follow-up for the conversation's first function."""
        named = re.findall(r"`(\w+)\(", messages[-1]["content"])
        entry = _CODE["python"].get(named[0]) if named else None
        if entry is None:
            return json.dumps({"request": "Now make it faster.", "function": "faster", "tests": []})
        follow = entry["follow_up"]
        return json.dumps({"request": follow["request"], "function": follow["function"], "tests": follow["tests"]})

    def tool_agent(self, messages: list[dict], body: dict) -> str:
        """The assistant's next step in a tool-use dialogue (`tool_use.stand_in`)."""
        request = messages[-1]["content"]
        return tool_use.stand_in(request, self._flawed(request, body), draw(request, body.get("seed", 0), "how"))

    def table(self) -> dict:
        """{system message: (kind, answer)} for `alignment.pas.teacher.TeacherService`."""
        return {
            constraint_expansion.EXPAND_SYSTEM: ("synth_expand", self.expand),
            constraint_expansion.VALIDATE_SYSTEM: ("synth_validate", self.validate),
            constraint_expansion.RESPOND_SYSTEM: ("synth_respond", self.respond),
            constraints_lib.CRITERIA_SYSTEM: ("synth_criteria", self.criteria),
            response_reversal.reverse_system(self.taxonomy): ("synth_reverse", self.reverse),
            response_reversal.INSPECT_SYSTEM: ("synth_inspect", self.inspect),
            system_messages.DECOMPOSE_SYSTEM: ("synth_decompose", self.decompose),
            system_messages.COMBINE_SYSTEM: ("synth_combine", self.combine),
            system_messages.QUERY_SYSTEM: ("synth_query", self.query),
            system_messages.ROLE_SYSTEM: ("synth_role", self.role),
            teacher_style.TEACHER_SYSTEM: ("synth_teach", self.teach),
            teacher_style.CHECK_SYSTEM: ("synth_check_teaching", self.check_teaching),
            math_solutions.SOLVE_SYSTEM: ("synth_solve", self.solve),
            reasoning.COT_SYSTEM: ("synth_think", self.think),
            reasoning.STUDENT_SYSTEM: ("synth_student", self.student),
            reasoning.REFLECT_SYSTEM: ("synth_reflect", self.reflect),
            coding.LABEL_SYSTEM: ("synth_label", self.label),
            coding.ANSWER_SYSTEM: ("synth_program", self.program),
            coding.FOLLOW_UP_SYSTEM: ("synth_follow_up", self.follow_up),
            tool_use.AGENT_SYSTEM: ("synth_tool_agent", self.tool_agent),
        }


def start(flaw_rate: float, taxonomy: constraints_lib.Taxonomy | None = None):
    """(server, base URL) of the embedded teacher answering the synthesis requests (and PAS's)."""
    # langdetect loads its profiles on first use; a first use from two threads at once would load them twice
    ifeval.response_language("Loading the language profiles before any request arrives.", "en")
    answers = Answers(flaw_rate, taxonomy or constraints_lib.load_taxonomy())
    return start_teacher(flaw_rate, answers=answers.table())
