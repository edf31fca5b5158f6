"""SFT of Qwen2-7B from Hugging Face weights with 2-way tensor and 2-way sequence parallelism (long rows).

    python -m alignment.launch --config=configs/sft_qwen2_7b.py --workdir=gs://BUCKET/sft-qwen \
        --config.init_from=/path/to/Qwen2-7B-Instruct --config.tokenizer=/path/to/Qwen2-7B-Instruct \
        --config.data.train.general.path=/data/sft.jsonl
"""
import ml_collections

from alignment.config import model_preset
from alignment_configs import sft


def get_config():
    c = sft.get_config()
    c.model = model_preset("qwen2_7b")
    c.init_from = ""  # a HF checkpoint directory
    c.tokenizer = ""  # the checkpoint directory (tokenizer.json)
    c.chat_template = "chatml"
    # 28 query / 4 key-value heads: tensor x sequence must divide 4.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=2, sequence=2))
    c.batch_size = 64  # rows of 32768 tokens
    c.steps = 1500
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.1
    c.checkpoint.every = 500
    c.eval_every = 250
    c.data.train = ml_collections.ConfigDict(dict(general=sft.source("", weight=0.8), math=sft.source("", weight=0.2)))
    c.data.eval = ml_collections.ConfigDict(dict(general=sft.source(""), math=sft.source("")))
    c.data.max_length = 32768
    c.model.remat_policy = "full"
    c.model.remat_group_size = 2  # the paper's multi-layer grouping: one checkpoint per 2 layers
    return c
