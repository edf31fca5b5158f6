"""Prompt quality: verdict parsing, the pinned Bradley-Terry fit against hand-computed cases, judging through a
real local HTTP judge (retries, failures, cache), and the scorer trained by the rm stage on the derived pairs."""
import http.server
import json
import re
import threading

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from alignment import stages
from alignment.config import load_config_file
from alignment.pas import quality

# writing anchors at 3, 9 and 16 words; math anchors at 4 and 11 words
ANCHORS = {
    "writing": [quality.Anchor("Write a poem.", 0.0),
                quality.Anchor("Write a poem about the sea in eight lines.", 2.0),
                quality.Anchor("Write a poem about the sea in eight lines for children, rhyming ABAB, with a title.",
                               4.0)],
    "math": [quality.Anchor("What is 2 + 2?", 0.0),
             quality.Anchor("Solve for x: 3x + 5 = 20 and show each step.", 2.0)],
}
WRITING_BY_QUALITY = ["Poem please.",  # 2 words: below every anchor
                      "Write a sea poem.",  # 4: between the first two
                      "Write a poem about the sea in eight lines for young children.",  # 12: between the last two
                      ("Write a poem about the sea in eight lines for young children, rhyming ABAB, with a short "
                       "title and a moral at the end.")]  # 23: above every anchor


class RuleJudge:
    """A threaded stdlib server for POST /v1/chat/completions judging prompt pairs by a fixed rule: the prompt
    with more words is clearer, more practical and more complex (equal counts tie); novelty always ties.
    A prompt containing GARBLE-ONCE gets an unparseable first answer per request, GARBLE-ALWAYS always does,
    FAIL-ALWAYS gets HTTP 500."""

    def __init__(self):
        self.requests, self.garbled = [], set()
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                judge.requests.append(text)
                if "FAIL-ALWAYS" in text or self.path != "/v1/chat/completions":
                    return self.reply(500, {"error": {"message": "judge overloaded"}})
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": judge.answer(text)}}]})

            def reply(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, text: str) -> str:
        if "GARBLE-ALWAYS" in text or ("GARBLE-ONCE" in text and text not in self.garbled):
            self.garbled.add(text)
            return "Prompt A is clearer, I would say."
        a, b = (len(re.search(rf"\[Prompt {x}\]\n(.*?)\n\[End of prompt {x}\]", text, re.DOTALL).group(1).split())
                for x in "AB")
        better = "A" if a > b else "B" if b > a else "tie"
        return "```json\n" + json.dumps({"clarity": better, "practicality": better, "complexity": better,
                                         "novelty": "tie"}) + "\n```"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_parse_verdict():
    full = {"clarity": "A", "practicality": "b", "complexity": "TIE", "novelty": "A"}
    assert quality.parse_verdict("```json\n" + json.dumps(full) + "\n```") == {
        "clarity": "A", "practicality": "B", "complexity": "tie", "novelty": "A"}
    assert quality.parse_verdict(json.dumps({**full, "novelty": "C"})) is None
    assert quality.parse_verdict(json.dumps({k: v for k, v in full.items() if k != "novelty"})) is None
    assert quality.parse_verdict("A is better") is None
    assert quality.parse_verdict('["A", "B"]') is None


def test_bradley_terry_matches_hand_computed_scores():
    c = 0.5
    # one anchor at 2, one win in one judgement: s = 2 + logit((1 + c/2) / (1 + c)) = 2 + log 5
    assert quality.bradley_terry([[1.0]], [[1.0]], [2.0], c)[0] == pytest.approx(2 + np.log(5), abs=1e-12)
    # ties only: the anchor's own score
    assert quality.bradley_terry([[1.5]], [[3.0]], [-1.0], c)[0] == pytest.approx(-1.0, abs=1e-12)
    # anchors 0 and 1, two wins against 0 and two losses against 1: midway by symmetry
    assert quality.bradley_terry([[2.0, 0.0]], [[2.0, 2.0]], [0.0, 1.0], c)[0] == pytest.approx(0.5, abs=1e-12)
    # two anchors at 0 with 3 wins in 4: sigmoid(s) = (3 + 2 c/2) / (4 + 2 c) = 0.7
    assert quality.bradley_terry([[1.5, 1.5]], [[2.0, 2.0]], [0.0, 0.0], c)[0] == pytest.approx(np.log(0.7 / 0.3),
                                                                                                   abs=1e-12)
    assert np.isnan(quality.bradley_terry([[0.0, 0.0]], [[0.0, 0.0]], [0.0, 1.0], c)[0])  # never judged


def test_bradley_terry_maximises_the_penalised_likelihood():
    rng = np.random.default_rng(0)
    anchors = rng.normal(size=4) * 2
    games = rng.integers(0, 5, size=(6, 4)).astype(float)
    wins = np.floor(rng.random((6, 4)) * (2 * games + 1)) / 2  # half-integers in [0, games]: ties included
    got = quality.bradley_terry(wins, games, anchors, prior_ties=0.3)
    for row in range(6):
        won, lost = wins[row] + 0.15, games[row] - wins[row] + 0.15  # 0.15: half of prior_ties each

        def neg_log_likelihood(s, won=won, lost=lost):
            return (won * np.logaddexp(0.0, anchors - s) + lost * np.logaddexp(0.0, s - anchors)).sum()

        best = minimize_scalar(neg_log_likelihood, bounds=(-30, 30), method="bounded", options={"xatol": 1e-10})
        assert got[row] == pytest.approx(best.x, abs=1e-6)


def _records():
    writing = [{"prompt": p, "category": "writing"} for p in WRITING_BY_QUALITY]
    flaky = [{"prompt": "Write a sea poem, GARBLE-ONCE.", "category": "writing"},
             {"prompt": "Write a sea poem, GARBLE-ALWAYS.", "category": "writing"},
             {"prompt": "What is 3 + 3, FAIL-ALWAYS?", "category": "math"}]
    math = [{"prompt": "Add 2 and 9.", "category": "math"},
            {"prompt": "Solve for x: 7x - 4 = 31, show each step, and check the answer by substitution.",
             "category": "math"}]
    return writing + flaky + math


def test_judged_scores_follow_the_rule_with_retries_failures_and_cache(tmp_path):
    records = _records()
    cache = str(tmp_path / "judgements.jsonl")
    with RuleJudge() as judge:
        ask = quality.endpoint_ask(judge.url, model="rule-judge")
        result = quality.score_prompts(records, ANCHORS, ask, cache, judge_id="rule-judge", attempts=3, workers=4)
        calls = len(judge.requests)

        writing = result.scores[:4]
        assert np.all(np.diff(writing) > 0), writing  # more words, better, as the rule says
        clarity = result.per_dimension["clarity"]
        assert clarity[0] < 0.0 < clarity[1] < 2.0 < clarity[2] < 4.0 < clarity[3]  # between the pinned anchors
        assert clarity[7] < 0.0 and clarity[8] > 2.0  # math anchors: 0 and 2
        np.testing.assert_allclose(result.per_dimension["novelty"][:4], 2.0, atol=1e-9)  # all ties: the middle
        assert result.scores[4] == pytest.approx(writing[1])  # retried, then judged like its twin
        assert np.isnan(result.scores[5]) and np.isnan(result.scores[6])  # never parsed / endpoint failed

        stats = result.stats
        assert stats.comparisons == 2 * (3 * 6 + 2 * 3)  # both orders against each bucket's anchors
        assert stats.retried == 6 + 6 + 4  # GARBLE-ONCE once each; the always-bad ones every time
        assert stats.unparseable == 6 and stats.failed == 4 and stats.unscored_prompts == 2
        assert stats.calls == calls == (stats.comparisons - 16) + 2 * 6 + 3 * 6 + 3 * 4
        assert any("unparseable" in e for e in stats.examples) and any("judge overloaded" in e for e in stats.examples)

        again = quality.score_prompts(records, ANCHORS, ask, cache, judge_id="rule-judge", attempts=3, workers=4)
        assert again.stats.cached == stats.comparisons - 10  # only the failures are asked again
        assert len(judge.requests) - calls == 3 * 10
        np.testing.assert_array_equal(again.scores, result.scores)

    kept, counts = quality.keep_above(records, result.scores, threshold=2.0)
    assert [r["prompt"] for r in kept] == [records[i]["prompt"] for i in (2, 3, 8)]
    assert counts == {"kept": 3, "below": 4, "unscored": 2}


def test_a_record_without_anchors_is_named():
    with pytest.raises(ValueError, match=r"record 1: field 'category'='poetry' has no anchors"):
        quality.score_prompts([{"prompt": "a", "category": "math"}, {"prompt": "b", "category": "poetry"}],
                              ANCHORS, lambda r: "", "/nonexistent/cache.jsonl", judge_id="j")


def test_preference_pairs_respect_buckets_and_gaps():
    texts = ["a", "b", "c", "d", "e"]
    scores = np.array([0.0, 1.0, 0.2, np.nan, 3.0])
    pairs = quality.preference_pairs(texts, scores, ["x", "x", "x", "x", "y"], min_gap=0.5, pairs_per_prompt=4)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("b", "a"), ("b", "c")]
    assert all(p["prompt"] == quality.SCORER_INSTRUCTION for p in pairs)
    assert pairs[0]["margin"] == pytest.approx(scores[texts.index(pairs[0]["chosen"])]
                                               - scores[texts.index(pairs[0]["rejected"])])


def _pool(rng, n):
    """Writing prompts of 1-6 constraints: the rule judge's quality order is their length."""
    subjects = ["the sea", "a city", "autumn", "a dog", "the moon", "a train"]
    extras = ["in eight lines", "for children", "rhyming ABAB", "with a title", "in a sad tone", "ending on a question"]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, len(extras) + 1))
        picked = [extras[i] for i in sorted(rng.choice(len(extras), k, replace=False))]
        out.append({"prompt": " ".join([f"Write a poem about {subjects[int(rng.integers(6))]}", *picked]) + ".",
                    "category": "writing"})
    return out


def test_scorer_trained_by_the_rm_stage_ranks_its_pairs(tmp_path):
    records = _pool(np.random.default_rng(0), 48)
    with RuleJudge() as judge:
        result = quality.score_prompts(records, ANCHORS, quality.endpoint_ask(judge.url), str(tmp_path / "j.jsonl"),
                                       judge_id="rule-judge", workers=4)
    texts = [r["prompt"] for r in records] + [a.prompt for a in ANCHORS["writing"]]
    scores = np.concatenate([result.scores, [a.score for a in ANCHORS["writing"]]])
    pairs = quality.preference_pairs(texts, scores, ["writing"] * len(texts), min_gap=0.5, pairs_per_prompt=6)
    assert len(pairs) > 100

    config = load_config_file("configs/rm.py")
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=2)  # smaller than tiny: seconds on CPU
    config.batch_size, config.steps, config.log_every, config.eval_every = 16, 24, 8, 0
    config.optimizer.lr, config.optimizer.warmup_steps, config.optimizer.schedule = 3e-3, 4, "constant"
    config.data.max_length, config.data.trim_multiple, config.data.eval_fraction = 80, 0, 0.2
    config.checkpoint.async_save = False
    scorer_dir = str(tmp_path / "scorer")
    summary = stages.run("rm", quality.scorer_config(config, pairs, scorer_dir), scorer_dir)
    assert summary["steps"] == 24 and summary["final_eval"]["accuracy"] > 0.75  # held-out pairs

    score = quality.load_scorer(str(tmp_path / "scorer"))
    chosen, rejected = score([p["chosen"] for p in pairs]), score([p["rejected"] for p in pairs])
    assert chosen.shape == (len(pairs),) and np.isfinite(chosen).all()
    accuracy = float(np.mean(chosen > rejected))
    assert accuracy >= 0.75, accuracy  # chance is 0.5
