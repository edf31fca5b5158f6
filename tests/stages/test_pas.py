"""The PAS pipeline over real local HTTP endpoints: complement generation with critique and regeneration, the whole
configs/pas.py stage on CPU, and PAS in front of the main model in generation and serving."""
import json
import os
import re
import subprocess
import sys

import pytest

from alignment.config import load_config_file
from alignment.generation.http_server import RequestError, make_server
from alignment.pas import critique
from alignment.pas.augment import LocalPas, Pas, load_pas
from alignment.pas.complement import Endpoint, generate_complements
from alignment.pas.data import embedded_prompts, load_prompt_pool, load_seeds, write_jsonl
from alignment.pas.teacher import TeacherService, start_teacher
from alignment.pas.template import combine, pas_messages, with_complement
from tests import REPO

ROOT = str(REPO)


@pytest.fixture()
def teacher():
    server, url = start_teacher(flaw_rate=0.5)
    yield server, url
    server.shutdown()


def test_complements_are_critiqued_regenerated_and_counted(teacher):
    server, url = teacher
    records = embedded_prompts(60, seed=3)
    kept, report = generate_complements(records, load_seeds(), Endpoint(url), Endpoint(url, temperature=0.0),
                                        attempts=4, workers=4)
    assert report["prompts"] == 60
    assert report["accepted"] + report["dropped_after_rejections"] + report["endpoint_errors"] == 60
    assert report["endpoint_errors"] == 0
    assert sum(report["rejections"].values()) >= report["rejected_tries"] > 10  # half the first tries are flawed
    assert set(report["rejections"]) <= set(critique.FAILURES)
    assert any(int(k) > 1 for k in report["accepted_on_try"])  # regeneration rescued some prompts
    assert len(kept) == report["accepted"] > 30
    for record in kept:
        assert critique.rule_failures(record["prompt"], record["complement"], record.get("answer")) == ()
    service = server.service
    assert service.requests["complement"] == report["accepted"] + report["rejected_tries"]
    # The critic is asked only about complements that passed the rules.
    assert service.requests["critique"] >= report["accepted"]


def test_same_seed_same_complements(teacher):
    _, url = teacher
    records = embedded_prompts(20, seed=4)
    first, _ = generate_complements(records, load_seeds(), Endpoint(url), seed=7, workers=4)
    second, _ = generate_complements(records, load_seeds(), Endpoint(url), seed=7, workers=1)
    assert [r["complement"] for r in first] == [r["complement"] for r in second]


def test_unreadable_critic_rejects_everything():
    class Mumbling(TeacherService):
        @staticmethod
        def _critique(request):
            return "hmm, hard to say"

    server = make_server(Mumbling(flaw_rate=0.0))
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        kept, report = generate_complements(embedded_prompts(6, seed=5), load_seeds(), Endpoint(url), Endpoint(url),
                                            attempts=2, workers=2)
    finally:
        server.shutdown()
    assert kept == [] and report["dropped_after_rejections"] == 6
    assert report["rejections"] == {"critic_unparseable": 12}


def test_unreachable_teacher_is_counted_not_fatal():
    records = embedded_prompts(5, seed=6)
    kept, report = generate_complements(records, load_seeds(), Endpoint("http://127.0.0.1:9", timeout=5.0))
    assert kept == [] and report["endpoint_errors"] == 5


def test_keywords_reach_the_teacher(teacher):
    _, url = teacher
    record = {"prompt_id": "k", "prompt": "What is inflation?", "category": "knowledge",
              "keywords": ["central bank", "2024"]}
    kept, _ = generate_complements([record], load_seeds(), Endpoint(url), attempts=10)
    assert "central bank, 2024" in kept[0]["complement"]
    assert "Search keywords" in pas_messages(record["prompt"], record["keywords"])[0]["content"]


def test_prompt_pool_errors_name_the_line(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"prompt": "Write a poem.", "category": "writing"}) + "\n" +
                    json.dumps({"messages": [{"role": "system", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"pool.jsonl:2: .*'prompt'"):
        load_prompt_pool(str(path), 0, 0)
    path.write_text(json.dumps({"prompt": "Write a poem.", "keywords": "sea"}) + "\n")
    with pytest.raises(ValueError, match=r"pool.jsonl:1: 'keywords' must be a list"):
        load_prompt_pool(str(path), 0, 0)


def test_complement_goes_to_the_last_user_turn_and_keeps_the_prompt():
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Write a poem."}]
    out = with_complement(messages, "[Write a poem.]")
    assert out[-1]["content"] == "Write a poem.\n\n[Write a poem.]" and out[:3] == messages[:3]
    assert messages[-1]["content"] == "Write a poem."  # input untouched
    assert combine("Prompt", "  ") == "Prompt"
    with pytest.raises(ValueError, match="no"):
        with_complement([{"role": "system", "content": "x"}], "x")


def pas_config(overrides: dict):
    config = load_config_file(os.path.join(ROOT, "configs", "pas.py"))
    config.data.num_embedded = 80
    config.data.max_eval = 6
    config.sft.steps = 30
    config.sft.eval_every = 0
    config.sft.log_every = 10
    config.max_new_tokens = 24
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def pas_run(tmp_path_factory):
    from alignment import stages

    workdir = str(tmp_path_factory.mktemp("pas"))
    summary = stages.run("pas", pas_config({}), workdir)
    return workdir, summary


def test_pas_stage_end_to_end(pas_run):
    workdir, summary = pas_run
    data = summary["data"]
    assert data["prompts"] == 80 and data["held_out"] == 6
    selection = data["selection"]
    assert selection["kept"] <= 74
    complements = data["complements"]
    assert complements["prompts"] == selection["kept"]
    assert complements["accepted"] + complements["dropped_after_rejections"] + complements["endpoint_errors"] == \
        complements["prompts"]
    with open(os.path.join(workdir, "data", "train.jsonl")) as f:
        chats = [json.loads(line) for line in f]
    assert len(chats) == complements["accepted"]
    assert chats[0]["messages"][0] == pas_messages(chats[0]["messages"][0]["content"].split("Prompt: ", 1)[1])[0]
    assert chats[0]["messages"][-1]["role"] == "assistant"
    held = summary["held_out"]
    assert held["held_out_prompts"] == 6 and 0.0 <= held["rule_pass_rate"] <= 1.0
    assert 0.0 <= held["rouge_l_vs_teacher"] <= 1.0
    assert summary["sft"]["loss"] > 0
    with open(os.path.join(workdir, "samples.jsonl")) as f:
        assert len(f.readlines()) == 6


def test_pas_stage_rerun_reuses_its_outputs(pas_run):
    from alignment import stages

    workdir, summary = pas_run
    before = os.path.getmtime(os.path.join(workdir, "pas_model", "summary.json"))
    again = stages.run("pas", pas_config({"teacher.url": "http://127.0.0.1:9"}), workdir)  # no teacher needed any more
    assert again["data"] == summary["data"]
    assert os.path.getmtime(os.path.join(workdir, "pas_model", "summary.json")) == before


def test_trained_pas_model_augments(pas_run):
    workdir, _ = pas_run
    pas = load_pas(os.path.join(workdir, "pas_model"), max_new_tokens=16)
    assert isinstance(pas, LocalPas)
    complements = pas.complements(["Write a poem about the moon.", "What is 20 percent of 60?"])
    assert len(complements) == 2 and all(isinstance(c, str) for c in complements)
    augmented = pas.augment("Write a poem about the moon.", ["moon"])
    assert augmented.startswith("Write a poem about the moon.")


ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.MULTILINE)  # absl's INFO prefix: I1207 09:49:43.306 ...


def augment_command(cwd, *args):
    """`python -m alignment.pas` run from `cwd` (not the repository) with the shipped config and `args`."""
    return subprocess.run([sys.executable, "-m", "alignment.pas", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_augment_cli(pas_run, tmp_path):
    workdir, _ = pas_run
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(str(prompts), [{"prompt": "Write a poem about the moon."},
                               {"messages": [{"role": "user", "content": "What is gravity?"}], "keywords": ["Newton"]}])
    out = tmp_path / "out.jsonl"
    result = augment_command(tmp_path, f"--config.pas={workdir}/pas_model", f"--config.input={prompts}",
                             f"--config.output={out}", "--config.max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-2000:]
    # Quiet by default: no absl/Orbax INFO lines (they came by the dozen while the checkpoint loaded).
    assert result.stdout == "" and not ABSL_INFO.search(result.stderr), result.stderr
    assert "_NonBlockingMetadataStore" not in result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["Write a poem about the moon.", "What is gravity?"]
    assert all(r["augmented"].startswith(r["prompt"]) for r in lines)
    # One prompt: stdout is the augmented prompt alone; --verbosity=1 brings the libraries' INFO lines to stderr.
    verbose = augment_command(tmp_path, f"--config.pas={workdir}/pas_model", "--config.prompt=Write a poem.",
                              "--config.keywords=moon, night", "--config.max_new_tokens=12", "--verbosity=1")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert verbose.stdout.startswith("Write a poem.") and not ABSL_INFO.search(verbose.stdout)
    assert ABSL_INFO.search(verbose.stderr), verbose.stderr


def test_augment_cli_with_no_flags_runs_offline(tmp_path):
    result = augment_command(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Write a poem about the sea.\n\n") and len(result.stdout.split()) > 10


@pytest.mark.parametrize("args, message", [
    (["--config.pas=PAS", "--config.promt=hi"], "error: unknown config key 'promt'. Did you mean 'prompt'?"),
    (["--config.pas=PAS", "--config.prompt=hi", "--config.input=x.jsonl"],
     "error: give one of config.prompt (one prompt) or config.input (a JSONL file), not both"),
    (["--config.pas=PAS", "--config.prompt=hi", "--config.max_new_tokens=0"],
     "error: config.max_new_tokens=0 must be > 0"),
    (["--config.pas=PAS", "--config.prompt=hi"], "error: PAS"),  # no trained PAS model there: the error names it
    (["--pas=PAS", "--prompt=hi"], "error: Unknown command line flag 'pas' (settings are --config.pas=...)"),
])
def test_augment_cli_errors_are_one_line(tmp_path, args, message):
    result = augment_command(tmp_path, *[arg.replace("PAS", str(tmp_path)) for arg in args])
    message = message.replace("PAS", str(tmp_path))
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_generate_stage_with_pas_in_front(pas_run, tmp_path):
    from alignment import stages

    workdir, _ = pas_run
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(str(prompts), [{"messages": [{"role": "user", "content": "Write a poem about the moon."}]}])
    config = load_config_file(os.path.join(ROOT, "configs", "generate.py"))
    config.prompts, config.max_new_tokens = str(prompts), 4
    config.pas.target, config.pas.max_tokens = os.path.join(workdir, "pas_model"), 12
    stages.run("generate", config, str(tmp_path))
    line = json.loads((tmp_path / "completions.jsonl").read_text())
    assert line["messages"][-1]["content"].startswith("Write a poem about the moon.\n\n")


class FixedPas(Pas):
    def __init__(self):
        self.seen = []

    def complements(self, prompts, keywords=None):
        self.seen.append((list(prompts), [list(k) for k in keywords]))
        return ["Answer in one short paragraph." for _ in prompts]


def test_serve_puts_pas_in_front():
    from alignment.generation.loading import build_engine
    from alignment.serve import Service, engine_config

    engine, tokenizer = build_engine(engine_config("embedded"))
    plain = Service(engine, tokenizer, "chatml", "m")
    pas = FixedPas()
    with_pas = Service(engine, tokenizer, "chatml", "m", pas=pas)
    body = {"messages": [{"role": "user", "content": "Write a poem."}], "max_tokens": 2, "seed": 0,
            "pas_keywords": ["sea"]}
    tokens = lambda service: service.chat_completions(dict(body))["usage"]["prompt_tokens"]
    extra = len(tokenizer.encode("\n\nAnswer in one short paragraph."))
    assert tokens(with_pas) >= tokens(plain) + extra - 2
    assert pas.seen == [(["Write a poem."], [["sea"]])]

    with pytest.raises(RequestError, match="pas_keywords"):
        with_pas.chat_completions({**body, "pas_keywords": "sea"})
