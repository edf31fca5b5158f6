"""A trained reward model (an rm run's checkpoint) as a scoring function of chats: what the `reward_model` reward
and PAS's RM-stage quality scorer call. The losses that train it are `alignment.algorithms.reward`."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from alignment.algorithms.reward import segment_last
from alignment.checkpoint import load_params
from alignment.data.chat import encode_chat
from alignment.data.tokenizer import load_tokenizer
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train import runtime
from alignment.train.state import abstract_params


def load_reward_model(checkpoint: str, config: dict | None = None, batch_size: int = 8):
    """A trained reward model as `score_fn(chats) -> np.ndarray [len(chats)]` float32.

    checkpoint: an rm run's workdir, its `checkpoints` directory or one step directory. config: the run's
    config (a dict or ConfigDict); by default `config.json` of the workdir. Each chat is a list of
    {role, content} messages ending with the assistant turn to score; it is rendered with the run's chat
    template and tokenizer, cut to data.max_length tokens (keeping the start), and scored at its last token.
    """
    if config is None:
        workdir = os.path.abspath(checkpoint)
        while not os.path.isfile(os.path.join(workdir, "config.json")) and workdir != os.path.dirname(workdir):
            workdir = os.path.dirname(workdir)
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {checkpoint} or above it; pass config=")
        with open(path) as f:
            config = json.load(f)
    config = ml_collections.ConfigDict(config if isinstance(config, dict) else config.to_dict())
    model_cfg = runtime.model_config(config)
    if not model_cfg.value_head:
        raise ValueError(f"{checkpoint}: the model config has no value head; is this a reward model?")
    model = Transformer(model_cfg)
    abstract = nn.meta.unbox(abstract_params(model, dummy_inputs()))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt_dir = os.path.join(checkpoint, "checkpoints") if os.path.isdir(os.path.join(checkpoint, "checkpoints")) \
        else checkpoint
    params = load_params(ckpt_dir, abstract, jax.tree.map(lambda _: device, abstract))
    tokenizer = load_tokenizer(config.tokenizer)
    max_length = config.data.max_length

    @jax.jit
    def score(tokens, positions, segment_ids):
        hidden = model.apply({"params": params}, tokens, positions, segment_ids)
        return segment_last(model.apply({"params": params}, hidden, method="values"), segment_ids, 1)[:, 0]

    def score_fn(chats) -> np.ndarray:
        ids = [encode_chat(tokenizer, list(chat), config.chat_template).ids[:max_length] for chat in chats]
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
