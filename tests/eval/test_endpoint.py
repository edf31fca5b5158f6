"""The HTTP paths against a real local OpenAI-compatible server: client (retries), judge + cache, the eval stage."""
import http.server
import json
import re
import threading

import pytest

from alignment.config import load_config_file
from alignment.data.jsonl_cache import JsonlCache
from alignment.eval import endpoint, judge, targets
from alignment.generation import client
from alignment.pas.augment import Pas
from alignment import stages
from tests import REPO

ROOT = REPO
FIXTURES = ROOT / "tests" / "fixtures" / "eval"


class FakeOpenAI:
    """A threaded stdlib HTTP server answering /v1/chat/completions with respond(model, messages)."""

    def __init__(self, respond):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if self.path != "/v1/chat/completions" or body.get("model") == "broken":
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(b'{"error": "bad request"}')
                    return
                if body.get("model") == "flaky" and len(server.requests) == 1:  # a 503 on the first request
                    self.send_response(503)
                    self.end_headers()
                    return
                text = respond(body["model"], body["messages"])
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _scripted_judge(prompt: str) -> str:
    """All items met when the response says GOOD, none otherwise; 'garble' gives an unparseable answer."""
    response = prompt.split("[Response]\n", 1)[1].split("\n\n[Checklist]", 1)[0]
    count = int(re.search(r"exactly (\d+) lines", prompt).group(1))
    if "garble" in response:
        return "I think it is fine."
    return "\n".join(f"{i}: {int('GOOD' in response)}" for i in range(1, count + 1))


def _model(model: str, messages: list) -> str:
    """'good' answers arithmetic and code correctly, 'bad' answers wrongly; 'judge' grades checklists."""
    text = messages[-1]["content"]
    if model == "judge":
        return _scripted_judge(text)
    if "def add" in text or "def neg" in text:
        body = "return a + b" if "def add" in text else "return -x"
        if model == "bad":
            body = "while True:\n        pass" if "def add" in text else "return x"
        name, args = ("add", "a, b") if "def add" in text else ("neg", "x")
        return f"Here you go:\n```python\ndef {name}({args}):\n    {body}\n```"
    arithmetic = re.match(r"What is ([\d +\-]+)\?", text)
    if arithmetic:
        value = eval(arithmetic.group(1)) if model == "good" else 10**6  # noqa: S307 (digits and +/- only)
        return f"Let me compute. The answer is {value}."
    return "GOOD answer" if model == "good" else "bad answer"


def test_chat_completion_round_trip_and_errors():
    with FakeOpenAI(lambda model, messages: f"{model}:{messages[-1]['content']}") as server:
        assert client.chat(server.url, [{"role": "user", "content": "hi"}], model="m") == "m:hi"
        assert server.requests[0]["model"] == "m"
        generate = endpoint.endpoint_generate_fn(server.url, model="x", workers=3, temperature=0.0)
        prompts = [[{"role": "user", "content": str(i)}] for i in range(7)]
        assert generate(prompts, 16) == [f"x:{i}" for i in range(7)]  # order kept across threads
        assert server.requests[-1]["max_tokens"] == 16
        with pytest.raises(RuntimeError, match=r"chat/completions: HTTP 400"):
            client.chat(server.url, [{"role": "user", "content": "hi"}], model="broken")
        assert len(server.requests) == 9  # a 4xx answer is not retried


def test_chat_retries_a_server_error():
    with FakeOpenAI(lambda model, messages: f"{model}:{messages[-1]['content']}") as server:
        assert client.chat(server.url, [{"role": "user", "content": "hi"}], model="flaky") == "flaky:hi"
        assert len(server.requests) == 2
        with pytest.raises(RuntimeError, match=r"HTTP 503"):
            server.requests.clear()
            client.chat(server.url, [{"role": "user", "content": "hi"}], model="flaky", retries=0)


def test_judge_caches_raw_judgements_and_counts_unparseable(tmp_path):
    items = [{"id": "a", "messages": [{"role": "user", "content": "Q"}], "response": "GOOD", "criteria": ["x", "y"]},
             {"id": "b", "messages": [{"role": "user", "content": "Q"}], "response": "meh", "criteria": ["x"]},
             {"id": "c", "messages": [{"role": "user", "content": "Q"}], "response": "garble", "criteria": ["x"]}]
    with FakeOpenAI(lambda model, messages: _scripted_judge(messages[-1]["content"])) as server:
        ask = lambda p: client.chat(server.url, [{"role": "user", "content": p}], model="default")
        path = str(tmp_path / "judgements.jsonl")
        first = judge.judge_checklists(items, ask, JsonlCache(path), judge_id="j", attempts=2, workers=2)
        assert [j.scores for j in first] == [[1, 1], [0], [0]]
        assert [j.parsed for j in first] == [True, True, False]
        assert len(server.requests) == 1 + 1 + 2  # the unparseable one was asked twice
        again = judge.judge_checklists(items, ask, JsonlCache(path), judge_id="j")
        assert [j.scores for j in again] == [j.scores for j in first]
        assert len(server.requests) == 4  # re-scored from the cache, no judge call
        judge.judge_checklists(items[:1], ask, JsonlCache(path), judge_id="another judge")
        assert len(server.requests) == 5


def test_parse_judgement():
    assert judge.parse_judgement("1: 1\n2: 0", 2) == [1, 0]
    assert judge.parse_judgement("Sure.\n1. **1**\n2) 0\n", 2) == [1, 0]
    assert judge.parse_judgement("1: 1", 2) is None  # an item missing
    assert judge.parse_judgement("1: 1\n1: 0\n2: 1", 2) is None  # contradictory


class _EchoPas(Pas):
    def complements(self, prompts, keywords=None):
        return [f"[more detail for {p}]" for p in prompts]


def test_prompt_augmentation_appends_to_last_user_turn():
    seen = []
    generate = targets.with_prompt_augmentation(
        lambda prompts, max_tokens: seen.extend(prompts) or ["ok"] * len(prompts), _EchoPas())
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert generate([messages], 8) == ["ok"]
    assert seen[0][-1]["content"] == "Q\n\n[more detail for Q]" and messages[-1]["content"] == "Q"


def _config(server_url: str, **overrides):
    config = load_config_file(str(ROOT / "configs" / "eval.py"))
    config.checkpoints = f"good={server_url},bad={server_url}"
    config.benchmarks = "arithmetic,humaneval,cfbench,ux"
    config.data.humaneval = str(FIXTURES / "humaneval_small.jsonl")
    config.data.cfbench = str(FIXTURES / "cfbench_small.json")
    config.data.ux = str(FIXTURES / "ux_small.jsonl")
    config.limit = 6
    config.num_samples = 2
    config.pass_k = "1,2"
    config.generation.temperature = 0.7
    config.judge.endpoint = server_url
    config.judge.model = "judge"
    config.sandbox.cpu_seconds = 1.0
    config.sandbox.wall_seconds = 3.0
    for key, value in overrides.items():
        setattr(config, key, value)
    stages.check(config)
    return config


def test_eval_stage_compares_checkpoints_and_resumes(tmp_path):
    with FakeOpenAI(_model) as server:
        config = _config(server.url)
        summary = stages.run("eval", config, str(tmp_path))
        requests = len(server.requests)
        assert summary["good"]["arithmetic"]["accuracy"] == 1.0
        assert summary["bad"]["arithmetic"]["accuracy"] == 0.0
        assert summary["good"]["humaneval"] == {"pass@1": 1.0, "pass@2": 1.0}
        assert summary["bad"]["humaneval"] == {"pass@1": 0.0, "pass@2": 0.0}  # a loop and a wrong answer
        assert summary["good"]["cfbench"] == {"PSR": 1.0, "CSR": 1.0, "ISR": 1.0}
        assert summary["bad"]["cfbench"] == {"PSR": 0.0, "CSR": 0.0, "ISR": 0.0}
        assert summary["good"]["ux"]["pass_rate"] == 1.0 and summary["bad"]["ux"]["pass_rate"] == 0.0

        # Rerun: everything comes from the caches.
        assert stages.run("eval", config, str(tmp_path)) == summary
        assert len(server.requests) == requests

    results = json.loads((tmp_path / "results.json").read_text())
    samples = results["good"]["humaneval"]["samples"]
    assert len(samples) == 4 and all(s["status"] == "passed" for s in samples)
    assert results["bad"]["cfbench"]["samples"][0]["judge_raw"] == "1: 0\n2: 0\n3: 0"
    assert results["good"]["ux"]["categories"] == {"chat": 1.0}
    summary_md = (tmp_path / "summary.md").read_text()
    assert "## cfbench" in summary_md and "| good | 2 |" in summary_md  # one response per cfbench prompt
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir())
    assert "arithmetic.png" in charts and "cfbench_categories.png" in charts
    assert (tmp_path / "charts" / "arithmetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_eval_runs_offline_on_the_embedded_model(tmp_path):
    config = load_config_file(str(ROOT / "configs" / "eval.py"))
    config.arithmetic.num_problems = 16
    summary = stages.run("eval", config, str(tmp_path))
    assert list(summary) == ["embedded"] and 0.0 <= summary["embedded"]["arithmetic"]["accuracy"] <= 1.0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["embedded"]["arithmetic"]["samples"]) == 16
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "charts" / "arithmetic.png").is_file()


def test_eval_stage_errors_are_clear(tmp_path):
    config = load_config_file(str(ROOT / "configs" / "eval.py"))
    config.endpoint = "http://127.0.0.1:9/v1"
    config.benchmarks = "cfbench"
    config.data.cfbench = str(FIXTURES / "cfbench_small.json")
    with pytest.raises(ValueError, match="set config.judge.endpoint"):
        stages.run("eval", config, str(tmp_path))
    config.benchmarks = "gsm9k"
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        stages.run("eval", config, str(tmp_path))


def test_sysbench_and_fbbench_loaders_and_scores(tmp_path):
    from alignment.eval import benchmarks

    sys_path = tmp_path / "sys.jsonl"
    sys_path.write_text(json.dumps({"id": "s1", "system": "Be brief.", "turns": [
        {"user": "Hi", "assistant": "Hello.", "criteria": ["brief"]},
        {"user": "More", "assistant": "Sure.", "criteria": ["brief", "polite"]},
        {"user": "Bye", "criteria": ["brief"]}]}) + "\n")
    samples = benchmarks.load_sysbench(str(sys_path), 0, 0)
    assert [s["id"] for s in samples] == ["s1/0", "s1/1", "s1/2"]
    assert [m["role"] for m in samples[2]["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    verdicts = {"s1/0": [1], "s1/1": [1, 0], "s1/2": [1]}  # turn 2 breaks the session
    fake = lambda items: [judge.Judgement(verdicts[i["id"]], True, "", "") for i in items]
    ctx = benchmarks.Context(judge=fake)
    results = benchmarks.score_sysbench(samples, ["r"] * 3, ctx)
    metrics = benchmarks.aggregate_sysbench(results, ctx)["metrics"]
    assert metrics == {"SSR": pytest.approx(1 / 3), "CSR": pytest.approx(2.5 / 3), "ISR": pytest.approx(2 / 3)}

    fb_path = tmp_path / "fb.jsonl"
    fb_path.write_text(json.dumps({"id": "f1", "messages": [{"role": "user", "content": "Fix it"}],
                                   "checklist": [{"criterion": "fixed", "weight": 0.7},
                                                 {"criterion": "explained", "weight": 0.3}]}) + "\n")
    fb = benchmarks.load_fbbench(str(fb_path), 0, 0)
    fake = lambda items: [judge.Judgement([0, 1], True, "", "") for _ in items]
    ctx = benchmarks.Context(judge=fake)
    scored = benchmarks.aggregate_weighted(benchmarks.score_fbbench(fb, ["r"], ctx), ctx)
    assert scored["metrics"]["score"] == pytest.approx(0.3)
    fb_path.write_text('{"id": "f2", "messages": [], "checklist": [{"criterion": "x"}]}\n')
    with pytest.raises(ValueError, match=r"fb.jsonl:1 checklist: missing field\(s\) \['weight'\]"):
        benchmarks.load_fbbench(str(fb_path), 0, 0)


def test_launch_dry_run_needs_no_model_or_endpoint():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "alignment.launch", "--config=configs/eval.py", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage: eval" in out.stdout and "parameters:" in out.stdout


def test_local_engine_generate_fn(tmp_path):
    """A checkpoint directory as target runs in-process through the rollout engine (random tiny model)."""
    pytest.importorskip("alignment.generation.engine")
    import flax.linen as nn
    import jax

    from alignment.models import Transformer
    from alignment.models.hf import save_hf_checkpoint
    from alignment.models.transformer import dummy_inputs
    from alignment.train import runtime

    config = load_config_file(str(ROOT / "configs" / "eval.py"))
    model_cfg = runtime.model_config(config)
    params = nn.meta.unbox(Transformer(model_cfg).init(jax.random.key(0), *dummy_inputs())["params"])
    save_hf_checkpoint(tmp_path / "tiny", model_cfg, params)
    generate = targets.make_generate_fn(config, str(tmp_path / "tiny"), "tiny")
    out = generate([[{"role": "user", "content": "What is 1 + 2?"}], [{"role": "user", "content": "Hi"}]], 4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
