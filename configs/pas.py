"""The Prompt Augmentation System on the embedded default: a generated prompt pool, selection, complements from
the embedded teacher (a rule-based stand-in served over HTTP), critique and regeneration, then SFT of the tiny
model into a PAS model, checked on held-out prompts.

    python -m alignment.launch --config=configs/pas.py --workdir=/tmp/pas
    python -m alignment.pas --config.pas=/tmp/pas/pas_model --config.prompt="Write a poem about the sea."

With a real teacher: --config.teacher.url=http://host:8000 --config.teacher.model=NAME (and teacher.api_key_env).
"""
import ml_collections

from alignment.config import model_preset
from alignment.pas import selection
from alignment_configs import rm, sft


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "pas"  # which stage runs
    c.seed = 0  # held-out split, few-shot order, teacher seeds
    c.data = ml_collections.ConfigDict(dict(
        prompts="embedded",  # JSONL of {prompt | messages, category, keywords?, answer?} or 'embedded'
        num_embedded=600,  # size of the generated pool (5 categories, ~10% planted duplicates)
        seeds="",  # golden {category, prompt, complement} JSONL for the few-shot requests; '' = the shipped seeds
        eval_fraction=0.1,  # share of the pool held out to check the trained PAS model
        max_eval=64,  # at most this many held-out prompts
    ))
    scorer = rm.get_config()  # the prompt scorer's rm run (quality.train_scorer); its data is set by the stage
    scorer.steps = 60
    scorer.data.max_length = 64
    c.quality = ml_collections.ConfigDict(dict(
        enabled=True,  # judge each prompt against its category's anchors and drop those at or below threshold
        anchors="",  # JSONL {bucket (= category), prompt, score}; '' = the shipped anchors of the 5 categories
        threshold=0.0,  # Bradley-Terry score (anchor scale) a prompt must exceed
        url="",  # judge API root; '' = the teacher's
        model="default",  # `model` sent to the judge
        max_tokens=128,  # room for the JSON verdict
        attempts=3,  # calls per comparison before it is counted as failed
        api_key_env="",  # environment variable with the judge's key when url is set
        train_scorer=False,  # also train a scorer model on the judged scores (rm stage) into <workdir>/scorer
        scorer=scorer,
    ))
    c.selection = ml_collections.ConfigDict(dict(
        enabled=True,  # dedup + task-aware diversity selection before complements are written
        embedder=ml_collections.ConfigDict(dict(  # the model whose mean-pooled hidden states embed prompts
            model=model_preset("tiny"), init_from="", tokenizer="embedded", seed=0)),
        options=selection.default_options(),  # dedup, clustering, triplet fine-tuning and threshold knobs
    ))
    # The embedded embedder is untrained: its mean-pooled states put prompts of one template within cosine
    # distance 0.01 of each other, so its cuts are far tighter than a trained encoder's defaults.
    c.selection.options.near_duplicate_similarity = 0.999
    c.selection.options.thresholds = (0.001, 0.002, 0.004)
    c.teacher = ml_collections.ConfigDict(dict(
        url="embedded",  # OpenAI-compatible API root of the teacher LLM; 'embedded' starts the built-in stand-in
        model="default",  # `model` sent to the teacher
        temperature=0.7,  # sampling temperature (regenerations use new seeds)
        max_tokens=128,  # complement length limit
        timeout=120.0,  # seconds per request
        workers=8,  # concurrent requests
        api_key_env="",  # name of the environment variable holding the API key ('' = none)
        flaw_rate=0.2,  # embedded teacher only: share of deliberately flawed complements (exercises the critique)
    ))
    c.critic = ml_collections.ConfigDict(dict(
        enabled=True,  # ask an LLM critic after the rule checks
        url="",  # critic API root; '' = the teacher's
        model="default",  # `model` sent to the critic
        max_tokens=128,  # room for the JSON verdict
        api_key_env="",  # environment variable with the critic's key when url is set
    ))
    c.complement = ml_collections.ConfigDict(dict(
        num_shots=2,  # golden examples of the prompt's category per request
        attempts=3,  # tries per prompt before it is dropped (and counted)
        max_words=60,  # longer complements over-extend (the paper aims at about 30 words)
        max_demands=4,  # more demand clauses than this is excessive
        language="en",  # the language of prompts too short to identify ('' = skip the language check for them)
    ))
    c.max_new_tokens = 64  # complement length of the trained PAS model at inference
    pas_sft = sft.get_config()  # the PAS model's SFT run (its data is set by the stage)
    pas_sft.steps = 400
    pas_sft.eval_every = 200
    pas_sft.data.max_length = 160
    pas_sft.data.num_embedded = 0
    pas_sft.data.num_embedded_eval = 0
    c.sft = pas_sft
    return c
