"""The Prompt Augmentation System pipeline: prompt pool -> selection -> complements -> PAS model -> check.

1. Load the prompt pool (JSONL or the embedded generated pool) and hold out `data.eval_fraction` of it.
2. Quality (optional): pairwise judgements against per-category anchors -> a score per prompt; prompts at or
   below `quality.threshold` are dropped (alignment.pas.quality); optionally a scorer model is trained on the
   judged scores through the rm stage (<workdir>/scorer), for pools too large to judge.
3. Selection (optional): dedup, task-aware diversity selection (alignment.pas.selection); each cluster keeps its
   highest-quality prompt when quality scores exist.
4. Complements for the training prompts from the teacher endpoint, filtered by the critique and regenerated
   when rejected (alignment.pas.complement); teacher complements for the held-out prompts too, as references.
5. Train the PAS model with the SFT stage on (PAS template, complement) chats -> <workdir>/pas_model.
6. Run the trained model on the held-out prompts: how many of its complements pass the critique rules, and how
   close they are (ROUGE-L F1) to the teacher's; samples.jsonl shows them side by side.

Each finished step leaves its output in the workdir (data/*.jsonl, pas_model/), and a rerun reuses it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import ml_collections
import numpy as np

from alignment import stages
from alignment.config import Field, at_least, in_range, one_of, positive
from alignment.pas import data as pas_data
from alignment.pas.cluster import LINKAGES
from alignment.pas.complement import Endpoint, generate_complements
from alignment.pas.critique import Rules, rule_failures
from alignment.pas.mining import lcs_ratio
from alignment.pas.template import pas_messages

logger = logging.getLogger(__name__)

FIELDS = {
    "data.num_embedded": positive(),
    "data.eval_fraction": Field(low=0, high=1, open_low=True),
    "data.max_eval": positive(),
    "quality.attempts": positive(),
    "selection.options.linkage": one_of(*LINKAGES),
    "selection.options.near_duplicate_similarity": Field(low=-1, high=1),
    "selection.options.num_coarse": positive(),
    "selection.options.num_fine": positive(),
    "selection.options.finetune_steps": at_least(0),
    "teacher.temperature": Field(low=0),
    "teacher.max_tokens": positive(),
    "teacher.timeout": Field(low=0, open_low=True),
    "teacher.workers": positive(),
    "teacher.flaw_rate": in_range(0, 1),
    "complement.num_shots": at_least(0),
    "complement.attempts": positive(),
    "complement.max_words": positive(),
    "max_new_tokens": positive(),
}


def check(config: ml_collections.ConfigDict) -> None:
    stages.check(config.sft)
    if config.quality.train_scorer:
        stages.check(config.quality.scorer)


def split_held_out(records: list[dict], fraction: float, max_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a seeded shuffle; held-out gets round(fraction * n) records, at most max_eval."""
    order = np.random.default_rng(seed).permutation(len(records))
    num_eval = min(int(round(fraction * len(records))), max_eval)
    return [records[i] for i in order[num_eval:]], [records[i] for i in order[:num_eval]]


def _key(section: ml_collections.ConfigDict) -> str:
    return os.environ.get(section.api_key_env, "") if section.api_key_env else ""


def start_endpoints(config: ml_collections.ConfigDict):
    """(teacher URL, server or None): the embedded teacher is started when teacher.url is 'embedded'."""
    if config.teacher.url != "embedded":
        return config.teacher.url, None
    from alignment.pas.teacher import start_teacher

    server, url = start_teacher(config.teacher.flaw_rate)
    logger.info("embedded teacher (rule-based stand-in for a teacher LLM) at %s", url)
    return url, server


def endpoints(config: ml_collections.ConfigDict, url: str) -> tuple[Endpoint, Endpoint | None]:
    """(teacher, critic or None) at their URLs ('' for the critic = the teacher's)."""
    t, c = config.teacher, config.critic
    teacher = Endpoint(url, t.model, t.temperature, t.max_tokens, t.timeout, _key(t))
    critic = None
    if c.enabled:
        critic = Endpoint(c.url or url, c.model, 0.0, c.max_tokens, t.timeout, _key(c) if c.url else _key(t))
    return teacher, critic


def score_quality(config: ml_collections.ConfigDict, records: list[dict], teacher_url: str, workdir: str
                  ) -> tuple[list[dict], dict]:
    """Records above the quality threshold, each with its `quality` score, and the report."""
    q = config.quality
    if not q.enabled:
        return records, {"enabled": False}
    from alignment.pas import quality

    url = q.url or teacher_url
    judge_id = f"{'embedded' if config.teacher.url == 'embedded' and not q.url else url}|{q.model}"
    ask = quality.endpoint_ask(url, model=q.model, max_tokens=q.max_tokens, api_key=_key(q))
    anchors = quality.load_anchors(q.anchors or quality.ANCHORS_PATH)
    scored = quality.score_prompts(records, anchors, ask, os.path.join(workdir, "data", "judgements.jsonl"),
                                   judge_id=judge_id, attempts=q.attempts, workers=config.teacher.workers)
    records = [{**r, "quality": float(s)} for r, s in zip(records, scored.scores)]
    kept, report = quality.keep_above(records, scored.scores, q.threshold)
    report["judging"] = dataclasses.asdict(scored.stats)
    if q.train_scorer:
        texts = [r["prompt"] for r in records]
        pairs = quality.preference_pairs(texts, scored.scores, [r["category"] for r in records], seed=config.seed)
        scorer_dir = os.path.join(workdir, "scorer")
        summary = stages.run("rm", quality.scorer_config(q.scorer, pairs, scorer_dir), scorer_dir)
        if summary["data"]["train"]["truncated"]:  # the scorer reads a cut prompt only up to the cut
            logger.warning("scorer: %d sequences cut to data.max_length=%d tokens",
                           summary["data"]["train"]["truncated"], q.scorer.data.max_length)
        report["scorer"] = {"pairs": len(pairs), "final_eval": summary.get("final_eval")}
    return kept, report


def critique_rules(config: ml_collections.ConfigDict) -> Rules:
    c = config.complement
    return Rules(max_words=c.max_words, max_demands=c.max_demands, default_language=c.language)


def training_chats(records: list[dict]) -> list[dict]:
    """PAS model examples: the PAS template around the prompt (and its keywords), the complement as the answer."""
    return [{"messages": pas_messages(r["prompt"], r.get("keywords", ())) + [
        {"role": "assistant", "content": r["complement"]}], "category": r["category"], "prompt_id": r["prompt_id"]}
        for r in records]


def select(config: ml_collections.ConfigDict, records: list[dict]) -> tuple[list[dict], dict]:
    if not config.selection.enabled:
        return records, {"enabled": False}
    from alignment.pas.embed import embedder_from_config
    from alignment.pas.selection import select_prompts

    embedder = embedder_from_config(config.selection.embedder)
    return select_prompts(records, embedder, config.selection.options)


def build_data(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Steps 1-3; writes data/train.jsonl, data/eval.jsonl (chats) and data/held_out.jsonl (prompts + teacher)."""
    d = config.data
    records = pas_data.load_prompt_pool(d.prompts, d.num_embedded, config.seed)
    train, held_out = split_held_out(records, d.eval_fraction, d.max_eval, config.seed)
    report = {"prompts": len(records), "held_out": len(held_out)}
    seeds = pas_data.load_seeds(d.seeds or pas_data.SEEDS_PATH)
    url, server = start_endpoints(config)
    teacher, critic = endpoints(config, url)
    c, rules = config.complement, critique_rules(config)
    generate = lambda rs, s: generate_complements(rs, seeds, teacher, critic, num_shots=c.num_shots,
                                                  attempts=c.attempts, rules=rules, workers=config.teacher.workers,
                                                  seed=s)
    try:
        train, report["quality"] = score_quality(config, train, url, workdir)
        train, report["selection"] = select(config, train)
        train, report["complements"] = generate(train, config.seed)
        held_out, report["held_out_complements"] = generate(held_out, config.seed + 1)
    finally:
        if server is not None:
            server.shutdown()
    if len(train) < 2 or not held_out:
        raise ValueError(f"only {len(train)} training and {len(held_out)} held-out prompts got an accepted "
                         f"complement; see the rejection counts: {report['complements']['rejections']}")
    directory = os.path.join(workdir, "data")
    pas_data.write_jsonl(os.path.join(directory, "train.jsonl"), training_chats(train))
    pas_data.write_jsonl(os.path.join(directory, "eval.jsonl"), training_chats(held_out))
    pas_data.write_jsonl(os.path.join(directory, "held_out.jsonl"), held_out)
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def train_pas_model(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Step 4: the SFT stage on data/train.jsonl (held-out loss on data/eval.jsonl) into <workdir>/pas_model
    (its checkpoints/model.json is what load_pas reads the model back from)."""
    source = lambda path: ml_collections.ConfigDict(dict(path=path, weight=1.0, format="auto", tfds_data_dir=""))
    directory = os.path.join(workdir, "pas_model")
    sft_config = ml_collections.ConfigDict(config.sft.to_dict())
    sft_config.data.train = ml_collections.ConfigDict({"pas": source(os.path.join(workdir, "data", "train.jsonl"))})
    sft_config.data.eval = ml_collections.ConfigDict({"pas": source(os.path.join(workdir, "data", "eval.jsonl"))})
    stages.run("sft", sft_config, directory)
    return directory


def check_model(config: ml_collections.ConfigDict, model_dir: str, workdir: str) -> dict:
    """Step 5: the trained PAS model on the held-out prompts, against the rules and the teacher's complements."""
    from alignment.pas.augment import LocalPas

    rules = critique_rules(config)
    with open(os.path.join(workdir, "data", "held_out.jsonl")) as f:
        held_out = [json.loads(line) for line in f]
    pas = LocalPas(model_dir, config.max_new_tokens)
    outputs = pas.complements([r["prompt"] for r in held_out], [r.get("keywords", ()) for r in held_out])
    samples, passed, similarity = [], 0, []
    for record, output in zip(held_out, outputs):
        failures = rule_failures(record["prompt"], output, record.get("answer"), rules) if output else ("empty",)
        passed += not failures
        similarity.append(lcs_ratio(output.lower().split(), record["complement"].lower().split()))
        samples.append({"prompt": record["prompt"], "category": record["category"], "pas": output,
                        "teacher": record["complement"], "failures": list(failures)})
    pas_data.write_jsonl(os.path.join(workdir, "samples.jsonl"), samples)
    return {"held_out_prompts": len(held_out), "rule_pass_rate": passed / max(len(held_out), 1),
            "rouge_l_vs_teacher": float(np.mean(similarity)) if similarity else 0.0}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if not os.path.isfile(os.path.join(workdir, "data", "report.json")):
        build_data(config, workdir)
    with open(os.path.join(workdir, "data", "report.json")) as f:
        summary = {"data": json.load(f)}
    model_dir = os.path.join(workdir, "pas_model")
    if not os.path.isfile(os.path.join(model_dir, "summary.json")):
        train_pas_model(config, workdir)
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary["sft"] = json.load(f).get("final_eval")
    summary["held_out"] = check_model(config, model_dir, workdir)
    logger.info("PAS: %s", summary["held_out"])
    return summary
