"""The embedded teacher: an OpenAI-compatible HTTP server that stands in for a teacher LLM offline.

The PAS pipeline talks to its teacher and critic only over HTTP (`alignment.generation.client.chat`), so any
OpenAI-compatible service (vLLM, a hosted API, `python -m alignment.serve` with a strong checkpoint) plugs in by
URL. A fresh machine has none, so `teacher.url='embedded'` starts this one: a deterministic, rule-based writer of
category-specific complements built from the prompt's topic, which on purpose writes a flawed complement (an
answer, another language, a wall of demands, ...) for a `flaw_rate` share of requests, and a critic that applies
the rule checks of `alignment.pas.critique`, and a prompt judge for quality scoring (`alignment.pas.quality`) that
prefers clear, specific prompts by surface features. It is there to exercise the pipeline (generation -> critique ->
regeneration -> training) end to end over a real socket; it is not a language model and its complements are
templates. Other pipelines add request kinds of their own (`answers`: the data-synthesis recipes of
`alignment.synth.embedded`), recognised, like the PAS ones, by their system message.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from typing import Callable, Mapping

from alignment.generation.http_server import RequestError, make_server
from alignment.pas.critique import rule_failures
from alignment.pas.quality import DIMENSIONS, JUDGE_TEMPLATE
from alignment.pas.template import CRITIC_SYSTEM, TEACHER_SYSTEM

_BANK = {
    "writing": ["Write about {topic} with vivid, concrete detail and a clear structure; keep the tone consistent "
                "and close with a memorable final line.",
                "Focus the piece on {topic}, give it a clear opening, middle and ending, and choose words that suit "
                "the intended readers."],
    "math": ["Solve the problem about {topic} step by step, check each calculation, and state the final number "
             "with its unit on the last line.",
             "Set up the calculation for {topic} clearly, show every intermediate result, and verify the final "
             "value before stating it."],
    "coding": ["Give complete, runnable code that {topic}, with clear names and a short docstring, and show one or "
               "two example calls.",
               "Explain the approach in two sentences, then provide working code that {topic}, handling edge cases "
               "such as empty input."],
    "knowledge": ["Explain {topic} accurately in plain language for a general reader, with one everyday example "
                  "and a one-sentence summary.",
                  "Cover what {topic} is, how it works and why it matters, in a few short paragraphs without jargon."],
    "advice": ["Offer practical, specific suggestions about {topic} as a short list, and say briefly why each "
               "one helps.",
               "Give realistic, encouraging steps for {topic}, ordered from easiest to hardest, with one concrete "
               "example."],
}
_DEFAULT = ["Answer the request about {topic} directly and completely, organise the answer clearly, and keep it "
            "focused on what was asked."]
_FLAWS = {
    "answers_prompt": "The answer is simple: {topic} is explained in full right here.",
    "switches_language": "Réponds à la question sur le sujet avec des détails précis et une structure claire, en "
                         "français.",
    "excessive_demands": "You must cite five sources. You must include a table. Always add a summary. Never use "
                         "simple words. Make sure to list every exception about {topic}.",
    "over_extends": " ".join(["Also discuss the history, the future, the economics and the ethics of {topic}."] * 5),
}
_STOP = {"write", "draft", "compose", "short", "about", "explain", "what", "why", "does", "give", "overview",
         "simple", "terms", "matter", "help", "plan", "ideas", "how", "can", "improve", "good", "habits", "for",
         "function", "program", "that", "with", "tests", "the", "a", "an", "of", "in", "on", "to", "me", "my", "is",
         "are", "please", "cheerful", "tone"}


def topic(prompt: str, category: str) -> str:
    """The phrase a complement should mention: what the prompt is about."""
    text = prompt.strip().rstrip(".?!")
    if category == "coding":
        match = re.search(r"\bthat (.+?)(,|$)", text)
        if match:
            return match.group(1)
    for pattern in (r"\babout (.+?)(?: for | in |$)", r"\bon (.+?)(?: for | in |$)", r"\bof (.+)$", r"\bfor (.+)$",
                    r"\bmy (.+)$", r"\bplan (.+)$", r"^what is (.+)$", r"^explain (.+?) in", r"^why does (.+?) matter"):
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            return match.group(1)
    words = [w for w in re.findall(r"[A-Za-z]+", text) if w.lower() not in _STOP]
    return " ".join(words[:4]) or "the request"


_JUDGE_PREFIX = JUDGE_TEMPLATE.split("\n", 1)[0]
_TASK = re.compile(r"^(write|draft|compose|explain|give|help|solve|compare|describe|list|plan|summari[sz]e|"
                   r"translate|what|why|how|which|who|when)\b", re.IGNORECASE)


def _prompt_features(prompt: str) -> tuple[int, int, int]:
    """(clarity, practicality, complexity) of a prompt, each a small integer."""
    words = re.findall(r"[A-Za-z]+", prompt)
    shouting = sum(w.isupper() and len(w) > 1 for w in words) > len(words) / 2
    clarity = int(not shouting) + int(prompt.strip()[-1:] in ".?!") + int(3 <= len(words) <= 40)
    practicality = int(bool(_TASK.match(prompt.strip().removeprefix("Please ")))) + int("?" in prompt or "." in prompt)
    complexity = len({w.lower() for w in words if w.lower() not in _STOP and len(w) > 2})
    return clarity, practicality, complexity


def _draw(*parts) -> float:
    """A number in [0, 1) fixed by the parts: the same request always gets the same answer."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# An added request kind: (messages, request body) -> the reply text.
Answer = Callable[[list[dict], dict], str]


class TeacherService:
    """The service interface of `alignment.generation.http_server` (models / chat_completions / completions).

    answers: {system message: (kind, Answer)}: further request kinds, tried before the PAS ones; `requests`
    counts every kind's requests by name.
    """

    def __init__(self, flaw_rate: float = 0.2, model_name: str = "embedded-teacher",
                 answers: Mapping[str, tuple[str, Answer]] | None = None):
        self.flaw_rate, self.model_name = flaw_rate, model_name
        self.answers = dict(answers or {})
        self.requests = {"complement": 0, "critique": 0}
        self._lock = threading.Lock()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "alignment"}]}

    def completions(self, body: dict) -> dict:
        raise RequestError("the embedded teacher answers /v1/chat/completions only", status=404)

    def chat_completions(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
        system = messages[0].get("content") if messages[0].get("role") == "system" else ""
        request = str(messages[-1].get("content", ""))
        if system in self.answers:
            kind, answer = self.answers[system]
            text = answer(messages, body)
        elif system == TEACHER_SYSTEM:
            kind, text = "complement", self._complement(request, body.get("seed", 0))
        elif system == CRITIC_SYSTEM:
            kind, text = "critique", self._critique(request)
        elif request.startswith(_JUDGE_PREFIX):
            kind, text = "judge", self._judge(request)
        else:
            raise RequestError("the embedded teacher only writes and critiques PAS complements and judges prompts "
                               "(the requests of alignment.pas.template and alignment.pas.quality)", param="messages")
        with self._lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                       "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": 0}}

    def _complement(self, request: str, seed) -> str:
        fields = dict(re.findall(r"^(Category|Prompt|Search keywords): (.*)$", request, re.MULTILINE))
        keywords = [k.strip() for k in fields.get("Search keywords", "").split(",") if k.strip()]
        return self.complement(fields.get("Prompt", request), fields.get("Category", ""), keywords, seed)

    def complement(self, prompt: str, category: str, keywords=(), seed=0) -> str:
        """The category's template complement for `prompt` (a flawed one for a flaw_rate share of prompts)."""
        subject = topic(prompt, category)
        if _draw(prompt, seed, "flaw") < self.flaw_rate:
            flaws = sorted(_FLAWS)
            return _FLAWS[flaws[int(_draw(prompt, seed, "kind") * len(flaws))]].format(topic=subject)
        options = _BANK.get(category, _DEFAULT)
        text = options[int(_draw(prompt, "variant") * len(options))].format(topic=subject)
        if keywords:
            text += f" Stay consistent with the search results on {', '.join(keywords)}."
        return text

    @staticmethod
    def _judge(request: str) -> str:
        """A prefers-the-more-specific-prompt judge: clarity (a sentence, not shouting), practicality (a task verb
        or a question), complexity (distinct content words); novelty always ties."""
        match = re.search(r"\[Prompt A\]\n(.*)\n\[End of prompt A\].*\[Prompt B\]\n(.*)\n\[End of prompt B\]", request,
                          re.DOTALL)
        if not match:
            return "cannot read the two prompts"
        features = [_prompt_features(match.group(i)) for i in (1, 2)]
        verdict = {}
        for index, dimension in enumerate(DIMENSIONS):
            a, b = (f[index] for f in features) if index < 3 else (0, 0)
            verdict[dimension] = "A" if a > b else "B" if b > a else "tie"
        return json.dumps(verdict)

    @staticmethod
    def _critique(request: str) -> str:
        match = re.match(r"Prompt: (.*)\nComplement: (.*)$", request, re.DOTALL)
        if not match:
            return json.dumps({"verdict": "reject", "failures": ["unreadable request"]})
        failures = rule_failures(match.group(1), match.group(2))
        return json.dumps({"verdict": "reject" if failures else "accept", "failures": list(failures)})


def start_teacher(flaw_rate: float = 0.2, host: str = "127.0.0.1", port: int = 0,
                  answers: Mapping[str, tuple[str, Answer]] | None = None):
    """(server, base_url): the embedded teacher serving in a background thread; `server.shutdown()` stops it."""
    service = TeacherService(flaw_rate, answers=answers)
    server = make_server(service, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"
