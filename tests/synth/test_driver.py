"""The shared driver: main-thread checks from worker threads, JSON verdict parsing, the call cache that makes a run
resumable, endpoint failures counted instead of fatal, verified generation and preference pairs."""
import threading
import types

import pytest

from alignment.synth import driver


class FakeEndpoint:
    """An endpoint whose replies come from a function of (messages, seed); counts its calls."""

    def __init__(self, reply, model="m", temperature=0.7, max_tokens=16):
        self.reply, self.model, self.temperature, self.max_tokens, self.calls = reply, model, temperature, max_tokens, 0

    def ask(self, messages, seed=None):
        self.calls += 1
        return self.reply(messages, seed)


def session(tmp_path, reply, critic=None, name="calls.jsonl"):
    return driver.Session(FakeEndpoint(reply), critic, str(tmp_path / name), "fake", seed=3, workers=4)


def test_checks_asked_from_workers_run_on_the_serving_thread(tmp_path):
    s = session(tmp_path, lambda m, seed: "x")
    threads = s.map(lambda _: s.on_main(threading.get_ident), range(6))
    assert set(threads) == {threading.get_ident()}

    def failing(_):
        return s.on_main(lambda: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        s.map(failing, [0])


@pytest.mark.parametrize("text, expected", [
    ('{"verdict": "accept", "failures": []}', ()),
    ('Sure.\n```json\n{"verdict": "reject", "failures": ["too long", "tone"]}\n```',
     ("critic:too long", "critic:tone")),
    ('{"verdict": "REJECT"}', ("critic:unspecified",)),
    ('{"verdict": "reject", "failures": "off topic"}', ("critic:off topic",)),
    ("I think it is fine", None),
    ('{"verdict": "maybe"}', None),
])
def test_verdicts_parse_from_json_anywhere_in_the_reply(text, expected):
    assert driver.parse_verdict(text) == expected


def test_json_is_looked_for_at_a_bounded_number_of_brackets():
    assert driver.parse_json_reply("{" * 10 + '{"a": 1}') == {"a": 1}
    assert driver.parse_json_reply("{" * 100 + '{"a": 1}') is None
    assert driver.parse_json_reply("[1, 2] then {}") == [1, 2]


def test_a_rerun_replays_every_call_from_the_cache(tmp_path):
    first = session(tmp_path, lambda m, seed: f"reply {seed}")
    replies = [first.ask([{"role": "user", "content": str(i)}], ("item", i)) for i in range(5)]
    assert first.teacher.calls == 5 and first.calls["teacher"] == 5
    again = session(tmp_path, lambda m, seed: "never asked")
    assert [again.ask([{"role": "user", "content": str(i)}], ("item", i)) for i in range(5)] == replies
    assert again.teacher.calls == 0 and again.calls["cached"] == 5
    # another model (or seed, or request) is another call
    other = driver.Session(FakeEndpoint(lambda m, seed: "new", model="other"), None, str(tmp_path / "calls.jsonl"),
                           "fake", seed=3)
    assert other.ask([{"role": "user", "content": "0"}], ("item", 0)) == "new"


def test_an_unreadable_critic_rejects_and_no_critic_accepts(tmp_path):
    mumbling = FakeEndpoint(lambda m, seed: "hmm")
    s = driver.Session(FakeEndpoint(lambda m, seed: ""), mumbling, str(tmp_path / "c.jsonl"), "fake",
                       critic_attempts=3)
    assert s.verdict([{"role": "user", "content": "x"}], "a") == ("critic_unparseable",)
    assert mumbling.calls == 3
    assert session(tmp_path, lambda m, seed: "", name="d.jsonl").verdict([], "a") == ()


def test_generate_verified_records_every_try_and_cleans_what_training_data_shows(tmp_path):
    replies = iter(["bad", "bad", "good REF", "unchecked"])
    s = session(tmp_path, lambda m, seed: next(replies))
    result = driver.Result("i")
    verify = lambda reply: [] if reply.startswith("good") else ["check:bad"]  # noqa: E731
    messages = [{"role": "system", "content": "teacher instructions"}, {"role": "user", "content": "q"}]
    kept = driver.generate_verified(s, result, messages, verify, 3, "salt", clean=lambda r: r.replace(" REF", ""))
    assert kept == "good" and result.rejected == {"check:bad": 2} and len(result.attempts) == 3
    assert all(a.messages == messages[1:] for a in result.attempts)  # the teacher's system message is not data
    assert result.attempts[-1].response == "good" and result.attempts[0].failures == ("check:bad",)
    assert driver.generate_verified(s, driver.Result("j"), messages, lambda r: ["x"], 1, "other") is None


def test_pairs_are_a_verified_response_against_distinct_failed_ones():
    prompt = [{"role": "user", "content": "q"}]
    attempts = [driver.Attempt(prompt, "bad 1", ("a",)), driver.Attempt(prompt, "bad 1", ("a",)),
                driver.Attempt(prompt, "bad 2", ("b", "c")), driver.Attempt(prompt, "good", ())]
    result = driver.Result("i", attempts=attempts)
    unverified = driver.Result("j", attempts=[driver.Attempt(prompt, "bad", ("a",))])
    pairs = driver.preference_pairs([result, unverified], "recipe", per_prompt=5)
    assert [(p["chosen"], p["rejected"], p["rejected_failures"]) for p in pairs] == [
        ("good", "bad 1", ["a"]), ("good", "bad 2", ["b", "c"])]
    assert len(driver.preference_pairs([result], "recipe", per_prompt=1)) == 1


def test_a_failing_endpoint_drops_the_item_and_the_run_goes_on(tmp_path):
    def reply(messages, seed):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("http://x: HTTP 500: overloaded")
        return "fine"

    recipe = types.SimpleNamespace(
        items=lambda options, seed, s: ([{"id": "a", "q": "ok"}, {"id": "b", "q": "boom"}], {"too_short": 2}),
        synthesize=lambda item, s, options: driver.Result(item["id"], records=[
            {"messages": [{"role": "assistant", "content": s.ask([{"role": "user", "content": item["q"]}], 0)}]}]))
    report = driver.run(recipe, "fake", None, session(tmp_path, reply), str(tmp_path), seed=0, pairs_per_prompt=1)
    assert report["items"] == 2 and report["records"] == 1 and report["dropped"] == {"endpoint_error": 1}
    assert report["filtered"] == {"too_short": 2} and "HTTP 500" in report["first_endpoint_error"]
    assert (tmp_path / "sft.jsonl").read_text().count("\n") == 1
