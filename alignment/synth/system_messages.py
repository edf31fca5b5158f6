"""Recipe 1 (report 4.1a): system messages. Decompose seed system prompts into their components, cluster each
component pool, assemble new system messages from the clusters with constraint prompts embedded, and filter
unreasonable combinations by rules and a critic; then a user turn and a response that follows the new system message.

1. Decomposition: the teacher splits each seed into task description, workflow, output specification,
   constraints and initial statement (JSON); a split is kept when every component is there and copied from the
   seed (at least 90% of its words occur in it).
2. Clustering: each component pool is embedded (TF-IDF word vectors, or a checkpoint's mean-pooled states with
   `embedder` set to it) and clustered with k-means (alignment.pas.cluster); assembly draws across the clusters.
3. Assembly: the task descriptions' clusters take turns; every other component is a member of a random cluster
   of its pool, from another seed, and a `coherent_share` of the time one that suits the task's domain (seeds
   may name their `domain`; a part found in seeds of several domains suits any); up to `max_constraints`
   constraint prompts from the taxonomy join the constraints component.
4. Filter: rules reject constraints that conflict (those the components state in the taxonomy's wording
   included), a workflow, output specification or constraints from another domain than the task's, an exact copy
   of a seed and overlong messages; the critic judges whether the parts fit together (a workflow, format,
   constraints and opening that suit the task).
5. Conversation: the teacher writes a first user message and answers it as the assistant the system message
   describes; the answer must meet every constraint the system message states (programs, then the critic).
"""
from __future__ import annotations

import collections
import math
import os
import re
import zlib

import numpy as np

from alignment.config import Field, at_least, positive
from alignment.synth import constraint_expansion, pools
from alignment.synth import constraints as constraints_lib
from alignment.synth.driver import (VERDICT_FORMAT, EndpointError, Result, Session, generate_verified,
                                    parse_json_reply, sft_record)

NAME = "system_messages"
FIELDS = {"num_items": positive(), "attempts": positive(), "num_clusters": positive(),
          "coherent_share": Field(low=0, high=1), "max_words": positive(),
          "max_constraints": at_least(0), "min_copied": Field(low=0, high=1)}
COMPONENTS = ("task_description", "workflow", "output_specification", "constraints", "initial_statement")
SEEDS_PATH = os.path.join(pools.DATA, "system_prompts.jsonl")
DECOMPOSE_SYSTEM = (
    "You take system prompts apart. Split the system prompt into five components, copying each one's text from it: "
    "the task description, the workflow, the output specification, the constraints and the initial statement (what "
    "the assistant says first). Reply with JSON only: {" + ", ".join(f'"{c}": ...' for c in COMPONENTS) + "}.")
COMBINE_SYSTEM = (
    "You check system messages assembled from parts of others. Reject one whose parts do not fit together: a "
    "workflow or output format that does not suit the task, constraints that contradict each other or the output "
    "format, an opening that does not suit the task. " + VERDICT_FORMAT)
QUERY_SYSTEM = ("Write the first message a user might send to the assistant whose system message follows. Reply with "
                "the user's message only.")
ROLE_SYSTEM = ("You play the assistant whose system message is given. Reply to the user's message as that assistant, "
               "following every instruction of its system message.")
_STOP = frozenset("""a an and are as at be by each first for from in is it of on or so that the then to with you your
your when what which this these those will not do does never always keep reply begin conversation work steps""".split())


def word_vectors(texts: list[str], dim: int = 1024) -> np.ndarray:
    """[n, dim] unit TF-IDF vectors of the texts' content words, hashed into `dim` buckets."""
    tokens = [[w for w in re.findall(r"[a-z]{3,}", t.lower()) if w not in _STOP] for t in texts]
    df = collections.Counter(w for words in tokens for w in set(words))
    vectors = np.zeros((len(texts), dim), np.float64)
    for row, words in enumerate(tokens):
        for word, count in collections.Counter(words).items():
            vectors[row, zlib.crc32(word.encode()) % dim] += count * (math.log((1 + len(texts)) / (1 + df[word])) + 1)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def embed(texts: list[str], embedder: str) -> np.ndarray:
    if not embedder:
        return word_vectors(texts)
    from alignment.generation.loading import checkpoint_config
    from alignment.pas.embed import embedder_from_config

    return np.asarray(embedder_from_config(checkpoint_config(embedder)).embed(texts), np.float64)


def decomposition_failures(reply: str, source: str, min_copied: float) -> tuple[list[str], dict]:
    parts = parse_json_reply(reply)
    if not isinstance(parts, dict):
        return ["decomposition:not_json"], {}
    failures = [f"decomposition:missing:{c}" for c in COMPONENTS if not isinstance(parts.get(c), str)
                or not parts[c].strip()]
    source_words = set(re.findall(r"\w+", source.lower()))
    for component in COMPONENTS:
        words = re.findall(r"\w+", str(parts.get(component, "")).lower())
        if words and sum(w in source_words for w in words) < min_copied * len(words):
            failures.append(f"decomposition:not_copied:{component}")
    return failures, {c: str(parts.get(c, "")).strip() for c in COMPONENTS}


def _decompose(seed: dict, session: Session, options) -> tuple[dict | None, list[str]]:
    rejected = []
    for attempt in range(options.attempts):
        try:
            reply = session.ask([{"role": "system", "content": DECOMPOSE_SYSTEM},
                                 {"role": "user", "content": seed["system"]}], (seed["id"], "decompose", attempt))
        except EndpointError:
            return None, rejected + ["decomposition:endpoint_error"]
        failures, parts = decomposition_failures(reply, seed["system"], options.min_copied)
        if not failures:
            return parts, rejected
        rejected += failures
    return None, rejected


def _usable(types: constraints_lib.Taxonomy) -> constraints_lib.Taxonomy:
    """The types a system message can carry: not those quoting the user's request (repeat_prompt)."""
    return constraints_lib.Taxonomy({k: t for k, t in types.types.items()
                                     if not any(constraints_lib.SEED in v for v in t.params.values())})


def _domains(parts: list[tuple[str, str, dict]]) -> dict[str, list[str]]:
    """{component: [its seed's domain per pool member]}; '' where the seed has none or where the same text occurs
    in seeds of several domains (a generic part, such as a stated output format, suits any task)."""
    domains = {}
    for component in COMPONENTS:
        seen = collections.defaultdict(set)
        for _, domain, p in parts:
            seen[p[component]].add(domain)
        domains[component] = [domain if len(seen[p[component]]) == 1 else "" for _, domain, p in parts]
    return domains


def _draw_part(groups: dict[int, list[int]], fits, rng: np.random.Generator) -> int:
    """A member of a random cluster, among the members `fits` accepts when any cluster has one."""
    fitting = {label: [m for m in members if fits(m)] for label, members in groups.items()}
    fitting = {label: members for label, members in fitting.items() if members} or groups
    members = fitting[sorted(fitting)[int(rng.integers(len(fitting)))]]
    return int(members[int(rng.integers(len(members)))])


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    """Decomposed seeds -> clustered component pools -> `num_items` assembled candidates."""
    seeds = pools.read_records(options.seeds or SEEDS_PATH, {"system": str})
    seeds = [{**s, "id": str(s.get("id", s["where"])), "domain": str(s.get("domain", ""))} for s in seeds]
    split = session.map(lambda s: _decompose(s, session, options), seeds)
    filtered = collections.Counter(f for _, failures in split for f in failures)
    parts = [(s["id"], s["domain"], p) for s, (p, _) in zip(seeds, split) if p is not None]
    filtered["seeds_not_decomposed"] = len(seeds) - len(parts)
    if len(parts) < 2:
        raise ValueError(f"only {len(parts)} seed system prompts could be decomposed; see {dict(filtered)}")
    rng = np.random.default_rng(seed)
    clusters = {c: _clusters(embed([p[c] for _, _, p in parts], options.embedder), options.num_clusters, seed)
                for c in COMPONENTS}
    domains = _domains(parts)
    types, usage = _usable(constraint_expansion.taxonomy(options)), collections.Counter()
    checks = [c.strip() for c in options.checks.split(",") if c.strip()]
    work = []
    for index in range(options.num_items):
        task_cluster = sorted(clusters["task_description"])[index % len(clusters["task_description"])]
        task = int(rng.choice(clusters["task_description"][task_cluster]))
        chosen, domain = {"task_description": task}, parts[task][1]
        for component in COMPONENTS[1:]:
            coherent = rng.random() < options.coherent_share
            fits = lambda m: m != task and (not coherent or domains[component][m] in ("", domain))  # noqa: E731
            chosen[component] = _draw_part(clusters[component], fits, rng)
        count = int(rng.integers(0, options.max_constraints + 1))
        added = constraints_lib.sample(types, rng, count, usage, checks)
        work.append({
            "id": f"system-{index}",
            "parts": {c: parts[i][2][c] for c, i in chosen.items()},
            "sources": {c: parts[i][0] for c, i in chosen.items()},
            "domains": {c: domains[c][i] if c != "task_description" else domain for c, i in chosen.items()},
            "added": [constraints_lib.state(types, c) for c in added]})
    return work, dict(filtered)


def _clusters(vectors: np.ndarray, num: int, seed: int) -> dict[int, list[int]]:
    """{cluster label: member indices} by spherical k-means."""
    from alignment.pas.cluster import kmeans

    labels = kmeans(vectors.astype(np.float32), min(num, len(vectors)), seed, spherical=True).assignments
    groups = collections.defaultdict(list)
    for index, label in enumerate(labels):
        groups[int(label)].append(index)
    return dict(groups)


def assemble(item: dict) -> str:
    parts = dict(item["parts"])
    parts["constraints"] = " ".join([parts["constraints"]] + item["added"])
    return "\n\n".join(parts[c] for c in COMPONENTS)


def rule_failures(item: dict, text: str, stated: list[dict], types: constraints_lib.Taxonomy, options) -> list[str]:
    failures = ["rule:conflicting_constraints"] if constraints_lib.conflicts(types, stated) else []
    task_domain = item["domains"]["task_description"]
    failures += [f"rule:{c}_from_another_domain" for c in ("workflow", "output_specification", "constraints")
                 if task_domain and item["domains"][c] not in ("", task_domain)]
    if len(set(item["sources"].values())) == 1 and not item["added"]:
        failures.append("rule:copies_a_seed")
    if len(text.split()) > options.max_words:
        failures.append("rule:too_long")
    return failures


def query_failures(query: str, system: str) -> list[str]:
    if not query or len(query.split()) > 80:
        return ["query:empty_or_too_long"]
    return ["query:copies_the_system_message"] if system.split("\n\n")[0] in query else []


def synthesize(item: dict, session: Session, options) -> Result:
    types = _usable(constraint_expansion.taxonomy(options))
    result = Result(item["id"], facts={"constraints": 0})
    system = assemble(item)
    _, stated = constraints_lib.find_stated(types, system)
    failures = rule_failures(item, system, stated, types, options)
    if not failures:
        failures = list(session.verdict([{"role": "system", "content": COMBINE_SYSTEM},
                                         {"role": "user", "content": f"System message:\n{system}"}],
                                        (item["id"], "combine")))
    if failures:
        result.reject(failures)
        return result.drop("combination_rejected")
    query = None
    for attempt in range(options.attempts):
        reply = session.ask([{"role": "system", "content": QUERY_SYSTEM}, {"role": "user", "content": system}],
                            (item["id"], "query", attempt)).strip()
        failures = query_failures(reply, system)
        if not failures:
            query = reply
            break
        result.reject(failures)
    if query is None:
        return result.drop("query_rejected")
    messages = [{"role": "system", "content": ROLE_SYSTEM},
                {"role": "user", "content": f"System message:\n{system}\n\nUser message:\n{query}"}]
    verify = lambda reply: constraints_lib.response_failures(  # noqa: E731
        types, session, f"{system}\n\n{query}", reply, stated, (item["id"], "judge", reply))
    shown = [{"role": "system", "content": system}, {"role": "user", "content": query}]
    response = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "respond"), shown)
    if response is None:
        return result.drop("response_rejected")
    result.facts["constraints"] = len(stated)
    result.records.append(sft_record(item["id"], NAME, "system_message",
                                     shown + [{"role": "assistant", "content": response}],
                                     sources=item["sources"], constraints=stated,
                                     **constraints_lib.ifeval_fields(types, stated)))
    return result


def needs_critic(options) -> bool:
    return "judge" in options.checks


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    kept = [r for r in results if r.records]
    mixed = sum(len(set(r.records[0]["sources"].values())) > 1 for r in kept)
    return {"kept_mixing_seeds": mixed,
            "constraints_per_kept_message": float(np.mean([r.facts["constraints"] for r in kept])) if kept else 0.0}
