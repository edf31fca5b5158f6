"""SFT on the embedded default: the tiny model learns the generated arithmetic task on CPU in minutes.

    python -m alignment.launch --config=configs/sft.py --workdir=/tmp/sft
"""
import ml_collections

from alignment.config import base_config, model_preset


def get_config():
    c = base_config()
    c.stage = "sft"
    c.model = model_preset("tiny")
    c.tokenizer = "embedded"
    c.chat_template = "chatml"
    c.batch_size = 32
    c.steps = 300
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.log_every = 20
    c.eval_every = 100
    c.data = ml_collections.ConfigDict(dict(
        train="embedded",  # 'embedded' (generated arithmetic chats) or a JSONL file of {"messages": [...]}
        eval="embedded",  # held-out records, same forms
        num_embedded=4000,  # generated training records when train='embedded'
        num_embedded_eval=256,  # generated held-out records when eval='embedded'
        max_length=64,  # tokens per row; longer samples are truncated or dropped, and counted
        truncation="truncate",  # truncate | drop
        train_on="all_assistant",  # all_assistant | last_assistant
    ))
    return c
