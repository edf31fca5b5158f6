"""Build the embedded tiny SentencePiece tokenizer `alignment/assets/tiny.model`.

Run `python -m alignment.data.build_tiny_tokenizer`. The corpus is generated in memory and training runs
single-threaded without sampling, so the output is byte-for-byte reproducible. The model keeps spaces and
newlines verbatim (identity normalisation, no dummy prefix) so chat templates can be encoded segment by
segment and decode back to exactly the rendered text.
"""
from __future__ import annotations

import io
import random

import sentencepiece as spm

from alignment.data.tokenizer import EMBEDDED_PATH

VOCAB_SIZE = 1024
CHAT_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

PROSE = """\
The river wound slowly through the valley, past the old mill and the orchards where apples ripened in the late summer sun.
Children walked to school along the narrow road, talking about games, books, and the small adventures of the day.
In the evening the town square filled with people who came to buy bread, fresh fish, vegetables, and flowers from the market.
A good explanation starts with a clear question, then breaks the problem into steps that are easy to follow and check.
Scientists measure things carefully, write down what they observe, and change their ideas when the evidence demands it.
The library was quiet except for the sound of pages turning and the soft hum of the lights above the long wooden tables.
Learning a new language takes patience: you listen, you repeat, you make mistakes, and slowly the words begin to feel natural.
When the storm passed, the sky turned a pale shade of blue and the air smelled of rain, earth, and cut grass.
Good software is tested often, documented clearly, and written so that the next person can understand why it works.
She opened the window, looked at the mountains in the distance, and decided that today would be a day for walking.
History is full of people who asked simple questions and refused to stop until they had found honest answers.
Cooking a meal for friends is a way of saying thank you, and sharing it is a way of saying welcome.
Numbers describe the world in a precise way: how many, how far, how fast, and how much has changed over time.
The train left the station at seven o'clock, carrying travelers toward the coast, the city, and the towns in between.
Every morning the baker lit the oven before sunrise so that the first loaves would be warm when the shop opened.
Writing well means choosing the right word, cutting what is not needed, and reading the sentence aloud to hear it.
"""

CHAT_PHRASES = """\
Hello! How can I help you today?
Hi, could you help me with a math problem?
Of course. Let's work through it step by step.
You are a helpful assistant.
You are a careful assistant that explains its reasoning.
Thank you, that was very helpful.
You're welcome! Let me know if you have any other questions.
Can you explain how you got that answer?
Sure. First we compute the part in parentheses, then we multiply.
I'm not sure I understand. Could you say that again more simply?
Please answer briefly.
The tool returned the following result.
Calling the calculator tool with the expression.
Here is a summary of what we discussed.
What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea.
Let me check that calculation once more to be sure.
"""


def arithmetic_examples(rng: random.Random, count: int) -> list[str]:
    """Multi-step arithmetic questions with worked answers, e.g. "What is (12 + 7) * 3?"."""
    lines = []
    for _ in range(count):
        a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 12)
        op = rng.choice(("+", "-"))
        inner = a + b if op == "+" else a - b
        total = inner * c
        lines.append(f"What is ({a} {op} {b}) * {c}?")
        lines.append(f"{a} {op} {b} = {inner}. {inner} * {c} = {total}. The answer is {total}.")
    return lines


def build_corpus() -> list[str]:
    """The training sentences, one per line, in a fixed order."""
    rng = random.Random(0)
    lines = arithmetic_examples(rng, 400)
    lines += PROSE.splitlines() + CHAT_PHRASES.splitlines()
    return [line for line in lines if line]


def train_model(corpus: list[str]) -> bytes:
    """Train the SentencePiece model and return its serialized bytes."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=out,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=list(CHAT_SPECIAL_TOKENS),
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


def main() -> None:
    model = train_model(build_corpus())
    with open(EMBEDDED_PATH, "wb") as f:
        f.write(model)
    print(f"wrote {EMBEDDED_PATH} ({len(model)} bytes, vocab {VOCAB_SIZE})")


if __name__ == "__main__":
    main()
