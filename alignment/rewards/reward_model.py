"""A trained reward model (an rm run's checkpoint) as a scoring function of chats: what the `reward_model` reward
and PAS's RM-stage quality scorer call. The losses that train it are `alignment.algorithms.rm`."""
from __future__ import annotations

import jax
import numpy as np

from alignment.algorithms.rm import segment_last
from alignment.data import model_info
from alignment.data.chat import encode_chat
from alignment.generation.loading import checkpoint_config, load


def load_reward_model(checkpoint: str, batch_size: int = 8):
    """A trained reward model as `score_fn(chats) -> np.ndarray [len(chats)]` float32.

    checkpoint: an rm run's workdir, its `checkpoints` directory or one step directory. Each chat is a list of
    {role, content} messages ending with the assistant turn to score; it is rendered with the run's chat
    template and tokenizer, cut to the run's data.max_length tokens (keeping the start), and scored at its last
    token.
    """
    config = checkpoint_config(checkpoint)
    info = model_info.read(config.init_from)
    if info is None or not info.model.get("value_head"):
        raise ValueError(f"{checkpoint}: not a reward model (no model.json with a value head; the rm stage writes "
                         "one to <workdir>/checkpoints)")
    loaded = load(config, single_device=True)
    model, params, tokenizer, template, max_length = (loaded.model, loaded.params, loaded.tokenizer,
                                                       loaded.chat_template, loaded.max_length)

    @jax.jit
    def score(tokens, positions, segment_ids):
        hidden = model.apply({"params": params}, tokens, positions, segment_ids)
        return segment_last(model.apply({"params": params}, hidden, method="values"), segment_ids, 1)[:, 0]

    def score_fn(chats) -> np.ndarray:
        ids = [encode_chat(tokenizer, list(chat), template).ids[:max_length] for chat in chats]
        out = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            tokens = np.zeros((batch_size, max_length), np.int32)
            segments = np.zeros_like(tokens)
            for i, seq in enumerate(chunk):
                tokens[i, :len(seq)], segments[i, :len(seq)] = seq, 1
            positions = np.broadcast_to(np.arange(max_length, dtype=np.int32), tokens.shape)
            out.append(np.asarray(score(tokens, positions, segments))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    return score_fn
