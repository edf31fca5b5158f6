"""Chat templates: exact official renderings, segment-wise token ids, role ids and loss masks."""
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from alignment.data.chat import ROLES, TEMPLATES, encode_chat, render_chat_text
from alignment.data.tokenizer import EMBEDDED_PATH, SentencePieceTokenizer, load_tokenizer
from tests import REPO

LLAMA2_MODEL = REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"

SYS, U1, A1, TOOL, U2, A2 = (
    "You are a helpful assistant.",
    "What is (12 + 7) * 3?",
    "Calling the calculator tool.",
    "57",
    "Thanks! Can you explain?",
    "12 + 7 = 19. 19 * 3 = 57. The answer is 57.",
)
CONVERSATION = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "tool", "content": TOOL},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]

EXPECTED_TEXT = {
    "llama2": (
        f"<s>[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{U1} [/INST] {A1} </s>"
        f"<s>[INST] {TOOL}\n\n{U2} [/INST] {A2} </s>"
    ),
    "llama3": (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYS}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        f"<|start_header_id|>ipython<|end_header_id|>\n\n{TOOL}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U2}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>"
    ),
    "chatml": (
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>tool\n{TOOL}<|im_end|>\n"
        f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n"
    ),
}

# The segments each template tokenizes separately; "<s>"/"</s>" stand for the BOS/EOS ids.
EXPECTED_SEGMENTS = {
    "llama2": [
        "<s>", "[INST]", " <<SYS>>\n", SYS, "\n<</SYS>>\n\n", U1, " [/INST]", f" {A1} ", "</s>",
        "<s>", "[INST]", f" {TOOL}", "\n\n", U2, " [/INST]", f" {A2} ", "</s>",
    ],
    "llama3": ["<|begin_of_text|>"] + [
        piece
        for header, content in [("system", SYS), ("user", U1), ("assistant", A1), ("ipython", TOOL), ("user", U2),
                                ("assistant", A2)]
        for piece in ("<|start_header_id|>", header, "<|end_header_id|>", "\n\n", content, "<|eot_id|>")
    ],
    "chatml": [
        piece
        for m in CONVERSATION
        for piece in ("<|im_start|>", f"{m['role']}\n", m["content"], "<|im_end|>", "\n")
    ],
}

END_TOKEN = {"llama2": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
GENERATION_PROMPT = {
    "llama2": " [/INST]",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("embedded")


def _segment_ids(tok, segment: str) -> list[int]:
    if segment == "<s>":
        return [tok.bos_id]
    if segment == "</s>":
        return [tok.eos_id]
    return tok.encode(segment)


def _masked_spans(tok, encoded) -> list[str]:
    """Decoded text of each maximal run of loss-masked tokens."""
    mask = encoded.loss_mask.astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tok.decode(encoded.ids[start:end]) for start, end in zip(edges[::2], edges[1::2])]


def _assistant_spans(template: str, contents: list[str]) -> list[str]:
    if template == "llama2":
        return [f" {c} </s>" for c in contents]
    return [c + END_TOKEN[template] for c in contents]


@pytest.mark.parametrize("template", TEMPLATES)
def test_render_matches_official_format(template):
    assert render_chat_text(CONVERSATION, template) == EXPECTED_TEXT[template]


@pytest.mark.parametrize("template", TEMPLATES)
def test_ids_are_segment_concatenation_and_decode_to_text(tiny, template):
    encoded = encode_chat(tiny, CONVERSATION, template)
    expected = [i for segment in EXPECTED_SEGMENTS[template] for i in _segment_ids(tiny, segment)]
    assert encoded.ids.tolist() == expected
    assert encoded.ids.dtype == np.int32 and encoded.roles.dtype == np.int8 and encoded.loss_mask.dtype == bool
    assert encoded.ids.shape == encoded.roles.shape == encoded.loss_mask.shape
    assert tiny.decode(encoded.ids) == EXPECTED_TEXT[template]


@pytest.mark.parametrize("template", TEMPLATES)
def test_loss_mask_covers_assistant_content_and_end_token(tiny, template):
    encoded = encode_chat(tiny, CONVERSATION, template)
    assert _masked_spans(tiny, encoded) == _assistant_spans(template, [A1, A2])
    assert np.all(encoded.roles[encoded.loss_mask] == ROLES.index("assistant"))


@pytest.mark.parametrize("template", TEMPLATES)
def test_roles_per_token(tiny, template):
    encoded = encode_chat(tiny, CONVERSATION, template)
    text_by_role = {
        role: tiny.decode(encoded.ids[encoded.roles == ROLES.index(role)], skip_special=True) for role in ROLES
    }
    assert SYS in text_by_role["system"]
    assert U1 in text_by_role["user"] and U2 in text_by_role["user"]
    assert TOOL in text_by_role["tool"]
    assert A2 in text_by_role["assistant"] and U1 not in text_by_role["assistant"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_last_assistant_only(tiny, template):
    encoded = encode_chat(tiny, CONVERSATION, template, train_on="last_assistant")
    assert _masked_spans(tiny, encoded) == _assistant_spans(template, [A2])
    assert encoded.ids.tolist() == encode_chat(tiny, CONVERSATION, template).ids.tolist()


@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt(tiny, template):
    prompt = CONVERSATION[:2]
    text = render_chat_text(prompt, template, add_generation_prompt=True)
    assert text.endswith(GENERATION_PROMPT[template])
    encoded = encode_chat(tiny, prompt, template, add_generation_prompt=True)
    assert tiny.decode(encoded.ids) == text
    assert not encoded.loss_mask.any()
    assert encoded.roles[-1] == ROLES.index("assistant" if template != "llama2" else "user")


def test_chatml_with_hf_tokenizer(tmp_path):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet)
    hf.train_from_iterator([SYS, U1, U2, A2], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    encoded = encode_chat(tok, CONVERSATION, "chatml")
    assert tok.decode(encoded.ids) == EXPECTED_TEXT["chatml"]
    assert _masked_spans(tok, encoded) == _assistant_spans("chatml", [A1, A2])


@pytest.mark.skipif(not LLAMA2_MODEL.exists(), reason=f"Llama-2 tokenizer not present at {LLAMA2_MODEL}")
def test_llama2_matches_reference_encoding():
    # Meta's reference: per (user, assistant) pair, [BOS] + encode("[INST] {user} [/INST] {answer} ") + [EOS].
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    messages = [m for m in CONVERSATION if m["role"] != "tool"]
    first = f"[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{U1} [/INST] {A1} "
    reference = [1, *sp.encode(first), 2, 1, *sp.encode(f"[INST] {U2} [/INST] {A2} "), 2]
    tok = load_tokenizer(str(LLAMA2_MODEL))
    encoded = encode_chat(tok, messages, "llama2")
    assert encoded.ids.tolist() == reference
    assert tok.decode(encoded.ids) == render_chat_text(messages, "llama2")


class _NoSpecials(SentencePieceTokenizer):
    """The embedded tokenizer pretending it has no chat special tokens and no BOS."""

    def __init__(self):
        super().__init__(EMBEDDED_PATH)
        self.bos_id = None

    def token_id(self, piece):
        return None if piece.startswith("<|") else super().token_id(piece)


def _with(index: int, **message) -> list[dict]:
    return CONVERSATION[:index] + [message] + CONVERSATION[index + 1 :]


BAD_INPUTS = [
    (_with(1, role="robot", content="hi"), "chatml", {}, [
        "message 1", "unknown role 'robot'", "system, user, assistant, tool"
    ]),
    (_with(1, content="hi"), "chatml", {}, ["message 1", "missing 'role'"]),
    (_with(1, role="user"), "chatml", {}, ["message 1", "missing 'content'"]),
    (_with(1, role="user", content=["hi"]), "chatml", {}, ["message 1", "content must be a string", "list"]),
    (_with(2, role="assistant", content=" \n "), "chatml", {}, ["message 2", "empty or whitespace-only"]),
    (CONVERSATION[:2], "llama3", {}, ["no assistant turn", "add_generation_prompt"]),
    ([], "chatml", {}, ["no messages"]),
    (CONVERSATION, "llama-3", {}, ["unknown chat template 'llama-3'", "did you mean 'llama3'"]),
    (CONVERSATION, "chatml", {"train_on": "everything"}, ["train_on 'everything'", "all_assistant, last_assistant"]),
    (CONVERSATION[:1] + CONVERSATION[2:], "llama2", {}, ["must start with a user or tool turn", "message 1"]),
    (CONVERSATION[:3] + CONVERSATION[2:3], "llama2", {}, ["message 3 (assistant) follows another assistant turn"]),
    (CONVERSATION[1:3] + CONVERSATION[:1], "llama2", {}, ["system", "only allowed first", "message 2"]),
]


@pytest.mark.parametrize("messages,template,kwargs,words", BAD_INPUTS)
def test_bad_input_raises(tiny, messages, template, kwargs, words):
    with pytest.raises(ValueError) as info:
        encode_chat(tiny, messages, template, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "template,missing",
    [("chatml", "<|im_start|>, <|im_end|>"), ("llama3", "<|begin_of_text|>, <|start_header_id|>"), ("llama2", "BOS")],
)
def test_tokenizer_missing_specials(template, missing):
    with pytest.raises(ValueError, match="needs special tokens the tokenizer lacks") as info:
        encode_chat(_NoSpecials(), CONVERSATION, template)
    assert missing in str(info.value)
