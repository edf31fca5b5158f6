"""Generate completions for chat prompts with the rollout engine; writes one JSONL line per prompt.

    python -m alignment.launch --config=configs/generate.py --workdir=/tmp/gen
    python -m alignment.launch --config=configs/generate.py --workdir=/tmp/gen \
        --config.init_from=/tmp/sft/checkpoints --config.prompts=prompts.jsonl --config.sampling.temperature=0.7

Defaults run on a fresh machine: the embedded tiny model (random weights unless init_from is set), the embedded
tokenizer and generated arithmetic questions.
"""
import ml_collections

from alignment.config import model_preset


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "generate"  # which stage runs
    c.seed = 0  # random init when init_from is empty; prompt i's samples use seed + i
    c.model = model_preset("tiny")  # ModelConfig fields; an HF init_from brings its own architecture
    c.init_from = ""  # '' (random init), a HF directory (config.json + safetensors) or an Orbax checkpoint
    c.tokenizer = ""  # 'embedded', a SentencePiece .model, a tokenizer.json or a directory; '' = init_from's, else embedded
    c.chat_template = ""  # llama2 | llama3 | chatml; '' = the one init_from was trained with, else chatml
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))  # -1 takes the rest
    c.sharding_rules = ml_collections.ConfigDict()  # logical axis -> mesh axes overrides of DEFAULT_RULES
    c.prompts_per_call = 32  # prompts per engine call (each gives num_samples completions)
    c.prompts = "embedded"  # 'embedded' (generated arithmetic questions) or a JSONL file of {"messages": [...]}
    c.num_embedded = 64  # prompts generated when prompts='embedded'
    c.output = ""  # output JSONL; '' = <workdir>/completions.jsonl
    c.num_samples = 1  # completions per prompt, all from one prefill of the prompt
    c.max_new_tokens = 64  # tokens generated at most per completion
    c.too_long = "error"  # a prompt that leaves no room for max_new_tokens: 'error' (names file:line) | 'skip' (counted)
    c.sampling = ml_collections.ConfigDict(dict(
        temperature=0.0,  # 0 = greedy; else logits are divided by it
        top_k=0,  # keep the k most likely tokens; 0 = off
        top_p=1.0,  # nucleus mass to keep; 1 = off
        min_p=0.0,  # keep tokens with probability >= min_p * the top probability; 0 = off
    ))
    c.pas = ml_collections.ConfigDict(dict(
        target="",  # PAS in front of the model: a pas run's pas_model directory or an API root; '' = off
        model="default",  # `model` sent to a PAS endpoint
        max_tokens=64,  # complement length
    ))
    c.stop = ()  # stop strings: the text is cut before the first one (EOS and end-of-turn always stop)
    return c
