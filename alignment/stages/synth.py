"""The synth stage: one of the capability data-synthesis recipes (alignment.synth) against a teacher endpoint.

`config.recipe` names the recipe and `config.<recipe>` holds its options. The teacher (and critic) is any
OpenAI-compatible endpoint by URL; 'embedded' starts the rule-based stand-in (alignment.synth.embedded), which
exercises the machinery offline with plausible and deliberately flawed replies. The workdir gets sft.jsonl (SFT stage
data), pairs.jsonl (RM / DPO stage data), attempts.jsonl and calls.jsonl (the call cache a rerun resumes from);
the summary counts items, kept records and rejections by reason. The preferences recipe gathers the pairs of
other synth runs, and with no sources given runs the recipes it names first, each into <workdir>/<recipe>.
"""
from __future__ import annotations

import logging
import os

import ml_collections

from alignment import stages
from alignment.config import Field, in_range, one_of, positive
from alignment.pas.complement import Endpoint
from alignment.synth import (coding, constraint_expansion, driver, embedded, math_solutions, preferences, reasoning,
                             response_reversal, system_messages, teacher_style, tool_use)

logger = logging.getLogger(__name__)

RECIPES = {
    "system_messages": system_messages,
    "constraints": constraint_expansion,
    "reversal": response_reversal,
    "teacher_style": teacher_style,
    "math": math_solutions,
    "reasoning": reasoning,
    "code": coding,
    "preferences": preferences,
    "tool_use": tool_use,
}

FIELDS = {
    "recipe": one_of(*RECIPES),
    "teacher.temperature": Field(low=0),
    "teacher.max_tokens": positive(),
    "teacher.timeout": Field(low=0, open_low=True),
    "teacher.workers": positive(),
    "teacher.flaw_rate": in_range(0, 1),
    "critic.max_tokens": positive(),
    "critic.attempts": positive(),
    "pairs_per_prompt": positive(),
    **{f"{name}.{key}": field for name, module in RECIPES.items() for key, field in module.FIELDS.items()},
}


def check(config: ml_collections.ConfigDict) -> None:
    if config.recipe not in config:
        raise ValueError(f"config.recipe={config.recipe!r} needs its options block config.{config.recipe}")
    options = config[config.recipe]
    if hasattr(RECIPES[config.recipe], "check"):
        RECIPES[config.recipe].check(options)
    if not config.critic.enabled and getattr(RECIPES[config.recipe], "needs_critic", lambda o: False)(options):
        raise ValueError(f"config.{config.recipe} has checks only a critic can make (tone, audience, ...) but "
                         "config.critic.enabled=False: they would go unverified")
    if config.recipe == "preferences":
        for name in preferences.recipe_names(options):
            stages.check(recipe_config(config, name))


def recipe_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The shipped config of recipe `name` with this run's seed, endpoints and the preferences block's size."""
    from alignment.config import config_path, load_config_file

    sub = load_config_file(config_path(f"synth/{name}"))
    for key in ("seed", "teacher", "critic", "pairs_per_prompt"):
        sub[key] = config[key]
    preferences.resize(sub[name], config.preferences.items_per_recipe)
    return sub


def _key(section: ml_collections.ConfigDict) -> str:
    return os.environ.get(section.api_key_env, "") if section.api_key_env else ""


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if config.recipe == "preferences":
        return run_preferences(config, workdir)
    recipe, options = RECIPES[config.recipe], config[config.recipe]
    t, c = config.teacher, config.critic
    server, url = None, t.url
    if t.url == "embedded":  # it answers in the wording of the run's constraint taxonomy
        server, url = embedded.start(t.flaw_rate, constraint_expansion.taxonomy(options) if "taxonomy" in options
                                     else None)
        logger.info("embedded teacher (rule-based stand-in for a teacher LLM) at %s", url)
    teacher = Endpoint(url, t.model, t.temperature, t.max_tokens, t.timeout, _key(t))
    critic = None
    if c.enabled:
        critic = Endpoint(c.url or url, c.model, 0.0, c.max_tokens, t.timeout, _key(c) if c.url else _key(t))
    endpoint_id = f"{t.url}|{c.url or t.url}"
    session = driver.Session(teacher, critic, os.path.join(workdir, "calls.jsonl"), endpoint_id, config.seed,
                             c.attempts, t.workers)
    try:
        return driver.run(recipe, config.recipe, options, session, workdir, seed=config.seed,
                          pairs_per_prompt=config.pairs_per_prompt)
    finally:
        if server is not None:
            server.shutdown()


def run_preferences(config: ml_collections.ConfigDict, workdir: str) -> dict:
    options = config.preferences
    sources = preferences.source_dirs(options)
    ran = {}
    if not sources:
        for name in preferences.recipe_names(options):
            directory = os.path.join(workdir, name)
            ran[name] = stages.run("synth", recipe_config(config, name), directory)
            sources.append(directory)
    summary = preferences.gather(sources, options, config.seed, workdir)
    if ran:
        summary["recipes"] = {name: {k: s[k] for k in ("items", "records", "pairs", "dropped")}
                              for name, s in ran.items()}
    return summary
