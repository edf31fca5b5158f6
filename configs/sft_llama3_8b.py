"""SFT of Llama-3.1-8B from Hugging Face weights on a TPU v5p-64 / 32 x H100 class slice.

    python -m alignment.launch --config=configs/sft_llama3_8b.py --workdir=gs://BUCKET/sft-8b \
        --config.init_from=/path/to/Meta-Llama-3.1-8B-Instruct --config.data.train.general.path=/data/sft.jsonl
"""
import ml_collections

from alignment.config import model_preset
from alignment_configs import sft


def get_config():
    c = sft.get_config()
    c.model = model_preset("llama3_8b")  # architecture comes from init_from's config.json; runtime fields from here
    c.init_from = ""  # a HF checkpoint directory (config.json + safetensors)
    c.tokenizer = ""  # set to the checkpoint directory (tokenizer.json)
    c.chat_template = "llama3"
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))  # FSDP over every chip
    c.batch_size = 128  # rows of 8192 tokens: about 1M tokens per step
    c.micro_batches = 1
    c.steps = 2000
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.1
    c.checkpoint.every = 500
    c.log_every = 10
    c.eval_every = 250
    c.data.train = ml_collections.ConfigDict(dict(
        general=sft.source("", weight=0.8),  # JSONL path of the general instruction data
        math=sft.source("", weight=0.2),  # the paper balances categories; math about 20%
    ))
    c.data.eval = ml_collections.ConfigDict(dict(general=sft.source(""), math=sft.source("")))
    c.data.max_length = 8192
    return c
