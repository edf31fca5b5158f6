"""The text formats of PAS: what the PAS model reads, what the teacher and the critic are asked, and how the
complement is joined to the user's prompt for the main model.

One definition each, shared by data building, training, inference (`augment`) and serving, so the PAS model is
always asked in the form it was trained on.
"""
from __future__ import annotations

from typing import Sequence

# Short on purpose: every token of it is paid on every PAS call.
PAS_INSTRUCTION = "Complement this prompt with a short instruction. Do not answer it."

# The five ways a complement can fail, as the paper's critique lists them.
FAILURES = {
    "conflicts_with_intent": "contradicts what the prompt asks (its length, language, format or content)",
    "over_extends": "adds requirements the prompt does not need, or is much longer than about 30 words",
    "answers_prompt": "answers or solves the prompt instead of instructing how to answer it",
    "excessive_demands": "piles up many demands or asks for something unreasonable",
    "switches_language": "is written in a different language from the prompt",
}

TEACHER_SYSTEM = (
    "You write complementary instructions for user prompts: about 30 words that add the scenario requirements, "
    "the intent behind the request and the expected format, so that an assistant answers better. Never answer "
    "the prompt, never contradict it, write in the prompt's language. Reply with the complement only.")

CRITIC_SYSTEM = (
    "You check complementary instructions written for user prompts. Reject a complement that: "
    + "; ".join(f"{name} ({rule})" for name, rule in FAILURES.items())
    + '. Reply with JSON only: {"verdict": "accept" or "reject", "failures": [names from that list]}.')


def pas_messages(prompt: str, keywords: Sequence[str] = ()) -> list[dict]:
    """The PAS model's input. Search keywords of a retrieval-augmented prompt ride along as constraints."""
    text = f"{PAS_INSTRUCTION}\n\nPrompt: {prompt}"
    if keywords:
        text += f"\nSearch keywords (stay consistent with them): {', '.join(keywords)}"
    return [{"role": "user", "content": text}]


def teacher_messages(prompt: str, category: str, examples: Sequence[dict], keywords: Sequence[str] = ()
                     ) -> list[dict]:
    """A few-shot request for one complement: golden (prompt, complement) examples of the category, then the prompt."""
    messages = [{"role": "system", "content": TEACHER_SYSTEM}]
    for example in examples:
        messages.append({"role": "user", "content": f"Category: {category}\nPrompt: {example['prompt']}"})
        messages.append({"role": "assistant", "content": example["complement"]})
    request = f"Category: {category}\nPrompt: {prompt}"
    if keywords:
        request += f"\nSearch keywords: {', '.join(keywords)}"
    messages.append({"role": "user", "content": request})
    return messages


def critic_messages(prompt: str, complement: str) -> list[dict]:
    return [{"role": "system", "content": CRITIC_SYSTEM},
            {"role": "user", "content": f"Prompt: {prompt}\nComplement: {complement}"}]


def combine(prompt: str, complement: str) -> str:
    """What the main model reads: the user's prompt unchanged, then the complement."""
    complement = complement.strip()
    return f"{prompt}\n\n{complement}" if complement else prompt


def last_user_turn(messages: list[dict]) -> int:
    """Index of the last user message (the one PAS complements); ValueError when there is none."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("PAS needs a user message to complement; the conversation has none")
    return users[-1]


def with_complement(messages: list[dict], complement: str) -> list[dict]:
    """messages with `complement` appended to the last user turn (a new list; input unchanged)."""
    last = last_user_turn(messages)
    return messages[:last] + [{**messages[last], "content": combine(messages[last]["content"], complement)}] + \
        messages[last + 1:]
