"""PAS data: prompt pools and golden seed complements.

The embedded pool is generated from templates over five categories, with planted exact and near duplicates
(real prompt logs are full of them), so the selection steps have something to remove on a fresh machine.
Files are JSONL with `prompt` (or chat `messages`), `category`, and optionally `keywords` (search keywords of a
retrieval-augmented prompt) and `answer`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from alignment.data.sources import read_jsonl

SEEDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds.jsonl")

_TOPICS = ["the ocean", "a rainy city", "friendship", "autumn leaves", "a lost dog", "space travel", "a small bakery",
           "the first day of school", "mountain hiking", "an old lighthouse", "a chess match", "a summer storm",
           "a night train", "grandmother's garden", "a robot learning to cook", "the last bookshop in town",
           "a desert sunrise", "moving to a new country", "a forgotten letter", "a village festival"]
_FORMS = ["poem", "short story", "blog post", "letter", "product description", "speech", "diary entry", "haiku"]
_AUDIENCES = ["children", "teenagers", "busy parents", "retirees", "new employees", "travellers", "students",
              "nurses"]
_TONES = ["cheerful", "melancholic", "formal", "playful", "hopeful", "mysterious"]
_ITEMS = ["pens", "apples", "tickets", "notebooks", "mugs", "candles", "plants", "batteries"]
_TASKS = ["reverses a string", "checks whether a number is prime", "counts the vowels in a sentence",
          "merges two sorted lists", "removes duplicates from a list", "computes the factorial of n",
          "finds the largest word in a text", "converts Celsius to Fahrenheit", "validates an email address",
          "parses a CSV line", "flattens a nested list", "computes a moving average", "checks for balanced brackets",
          "counts word frequencies in a file"]
_LANGUAGES = ["Python", "JavaScript", "Go", "Rust", "Java", "C++"]
_CONCEPTS = ["photosynthesis", "inflation", "gravity", "the water cycle", "machine learning", "vaccines",
             "plate tectonics", "compound interest", "the immune system", "renewable energy", "black holes",
             "supply and demand", "the French Revolution", "DNA replication", "climate change", "encryption",
             "the stock market", "volcanoes", "antibiotics", "the internet"]
_SKILLS = ["public speaking", "time management", "cooking", "sleep", "running", "focus at work", "writing",
           "negotiation", "learning a language", "saving money", "posture", "drawing"]
_EVENTS = ["a birthday party", "a team offsite", "a rainy weekend", "a family reunion", "a school fair",
           "a camping trip", "a wedding toast", "a job interview", "a charity run", "a book club meeting"]

_TEMPLATES = {
    "writing": ["Write a {form} about {topic}.", "Write a {form} about {topic} for {audience}.",
                "Draft a short {form} about {topic}.", "Compose a {form} on {topic} in a {tone} tone.",
                "Write a {tone} {form} about {topic} for {audience}."],
    "math": ["A shop sells {item} for {a} dollars each. How much do {b} {item} cost?",
             "What is {p} percent of {c}?", "Solve for x: {a}x + {b} = {c}.",
             "A train travels {c} km in {a} hours. What is its average speed?"],
    "coding": ["Write a {lang} function that {task}.", "Explain how to write a {lang} program that {task}.",
               "Write a function in {lang} that {task}, with tests.", "Review my {lang} code that {task}."],
    "knowledge": ["What is {concept}?", "Explain {concept} in simple terms.", "Why does {concept} matter?",
                  "Give a short overview of {concept}.", "Explain {concept} to {audience}."],
    "advice": ["How can I improve my {skill}?", "Give me ideas for {event}.", "What are good habits for {skill}?",
               "Help me plan {event}.", "Give {audience} tips on {skill}."],
}
CATEGORIES = tuple(sorted(_TEMPLATES))


def _fill(template: str, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, reference answer or '') for one template."""
    pick = lambda options: options[int(rng.integers(len(options)))]
    a, b = int(rng.integers(2, 10)), int(rng.integers(2, 12))
    c = int(rng.integers(3, 30)) * a
    values = dict(form=pick(_FORMS), topic=pick(_TOPICS), audience=pick(_AUDIENCES), tone=pick(_TONES),
                  item=pick(_ITEMS), a=a, b=b,
                  c=c, p=int(rng.choice([10, 20, 25, 50])), lang=pick(_LANGUAGES), task=pick(_TASKS),
                  concept=pick(_CONCEPTS), skill=pick(_SKILLS), event=pick(_EVENTS))
    prompt = template.format(**values)
    answers = {"How much": a * b, "percent": values["p"] * c / 100, "Solve for x": (c - b) / a, "average": c / a}
    answer = next((f"{v:g}" for key, v in answers.items() if key in prompt), "")
    return prompt, answer


def embedded_prompts(num: int, seed: int, duplicate_rate: float = 0.1) -> list[dict]:
    """`num` records {prompt_id, prompt, category, answer?}: categories in equal shares, a `duplicate_rate`
    fraction of them exact or near (case / punctuation / filler word) copies of earlier ones."""
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    for i in range(num):
        if records and rng.random() < duplicate_rate:
            source = records[int(rng.integers(len(records)))]
            prompt = source["prompt"]
            variant = int(rng.integers(3))
            prompt = [prompt, "Please " + prompt[0].lower() + prompt[1:], prompt.upper()][variant]
            record = {**source, "prompt": prompt}
        else:
            category = CATEGORIES[i % len(CATEGORIES)]
            prompt, answer = _fill(_TEMPLATES[category][int(rng.integers(len(_TEMPLATES[category])))], rng)
            record = {"prompt": prompt, "category": category}
            if answer:
                record["answer"] = answer
        records.append({**record, "prompt_id": f"pas-{seed}-{i}"})
    return records


def prompt_text(record: dict, where: str) -> str:
    """The prompt of a record: its `prompt` field, or the last user message of its `messages`."""
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"]
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str) and users[-1].strip():
            return users[-1]
    raise ValueError(f"{where}: a prompt record needs a non-empty 'prompt' or a user message in 'messages'")


def load_prompt_pool(path: str, num_embedded: int, seed: int, default_category: str = "general") -> list[dict]:
    """Records with `prompt`, `category` and `prompt_id` from a JSONL file, or the embedded pool."""
    if path == "embedded":
        return embedded_prompts(num_embedded, seed)
    records = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        keywords = record.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise ValueError(f"{where}: 'keywords' must be a list of strings")
        records.append({**record, "prompt": prompt_text(record, where),
                        "category": str(record.get("category") or default_category),
                        "prompt_id": str(record.get("prompt_id", where))})
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def load_seeds(path: str = SEEDS_PATH) -> dict[str, list[dict]]:
    """Golden examples by category: JSONL lines {category, prompt, complement}."""
    seeds: dict[str, list[dict]] = {}
    for number, record in read_jsonl(path):
        missing = [k for k in ("category", "prompt", "complement") if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{number}: seed example needs string fields {missing}")
        seeds.setdefault(record["category"], []).append(record)
    if not seeds:
        raise ValueError(f"{path}: no seed examples")
    return seeds


def write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
