"""Checklist metrics: every sample carries criteria that a judge marks 0 or 1.

  CFBench (Zhang et al. 2024): CSR, ISR and PSR with primary/secondary requirements, per sample then averaged.
  SysBench (Qin et al. 2024): CSR, ISR per turn and SSR per multi-turn session.
  FB-Bench (Li et al. 2024): weighted checklists, score = sum of weights of the satisfied items / total weight.
  The Baichuan paper's user-experience pass rate: per category, a sample passes only if it meets all criteria.
All functions are pure; judgements are sequences of 0/1 (or bools).
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

PRIMARY, SECONDARY = "primary", "secondary"
# CFBench's data marks requirement priority in Chinese: 主需 (primary need), 次需 (secondary need).
CFBENCH_PRIORITY = {"主需": PRIMARY, "次需": SECONDARY}


def _check(scores: Sequence[int]) -> list[int]:
    if not len(scores):
        raise ValueError("a checklist needs at least one criterion")
    values = [int(s) for s in scores]
    if any(v not in (0, 1) for v in values):
        raise ValueError(f"checklist judgements must be 0 or 1, got {list(scores)}")
    return values


def csr(scores: Sequence[int]) -> float:
    """Constraint satisfaction rate of one sample: the fraction of its criteria met."""
    values = _check(scores)
    return sum(values) / len(values)


def isr(scores: Sequence[int]) -> float:
    """Instruction satisfaction of one sample: 1 when every criterion is met."""
    return float(all(_check(scores)))


def psr(scores: Sequence[int], priorities: Sequence[str]) -> float:
    """CFBench's priority satisfaction of one sample, as its evaluation script defines it:
    any primary requirement unmet -> 0; only primary requirements -> 1 (all met);
    only secondary -> 1 when more than 80% are met; both -> 1 when 0.5 + 0.5 * (secondary rate) > 0.8,
    i.e. when more than 60% of the secondary requirements are met.
    The thresholds are compared in integers so 3 of 5 (exactly 60%) fails without float round-off."""
    values = _check(scores)
    if len(priorities) != len(values):
        raise ValueError(f"{len(values)} judgements but {len(priorities)} priorities")
    if any(p not in (PRIMARY, SECONDARY) for p in priorities):
        raise ValueError(f"priorities must be {PRIMARY!r} or {SECONDARY!r}, got {list(priorities)}")
    primary = [v for v, p in zip(values, priorities) if p == PRIMARY]
    secondary = [v for v, p in zip(values, priorities) if p == SECONDARY]
    if not all(primary):
        return 0.0
    if not secondary:
        return 1.0
    if not primary:
        return float(5 * sum(secondary) > 4 * len(secondary))
    return float(5 * sum(secondary) > 3 * len(secondary))


def cfbench_metrics(scores: Sequence[Sequence[int]], priorities: Sequence[Sequence[str]]) -> dict:
    """Mean CSR, ISR and PSR over samples."""
    if not scores:
        raise ValueError("no CFBench samples to aggregate")
    return {"CSR": float(np.mean([csr(s) for s in scores])),
            "ISR": float(np.mean([isr(s) for s in scores])),
            "PSR": float(np.mean([psr(s, p) for s, p in zip(scores, priorities, strict=True)]))}


def sysbench_metrics(sessions: Sequence[Sequence[Sequence[int]]]) -> dict:
    """SysBench metrics over sessions, each a list of turns, each turn a list of judgements:
    CSR = mean over turns of the fraction of constraints met; ISR = fraction of turns with all met;
    SSR = mean over sessions of (turns fully satisfied before the first failure) / (turns in the session)."""
    turns = [t for session in sessions for t in session]
    if not turns:
        raise ValueError("no SysBench turns to aggregate")
    stable = []
    for session in sessions:
        passed = [isr(t) for t in session]
        run = next((i for i, ok in enumerate(passed) if not ok), len(passed))
        stable.append(run / len(passed))
    return {"CSR": float(np.mean([csr(t) for t in turns])), "ISR": float(np.mean([isr(t) for t in turns])),
            "SSR": float(np.mean(stable))}


def weighted_score(scores: Sequence[int], weights: Sequence[float]) -> float:
    """FB-Bench's checklist score of one sample: satisfied weight over total weight."""
    values = _check(scores)
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} judgements but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"checklist weights must be non-negative with a positive sum, got {list(weights)}")
    return float(np.dot(values, weights) / np.sum(weights))


def pass_rate_by_category(scores: Sequence[Sequence[int]], categories: Sequence[str]) -> dict:
    """The user-experience pass rate: per category (and 'all'), the fraction of samples meeting every
    criterion."""
    if len(scores) != len(categories):
        raise ValueError(f"{len(scores)} samples but {len(categories)} categories")
    if not scores:
        raise ValueError("no samples to aggregate")
    groups = collections.defaultdict(list)
    for s, category in zip(scores, categories):
        groups[category].append(isr(s))
    rates = {c: float(np.mean(v)) for c, v in sorted(groups.items())}
    rates["all"] = float(np.mean([isr(s) for s in scores]))
    return rates
