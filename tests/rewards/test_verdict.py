"""Verdicts: tests split into calls and expectations in the caller, returned values decoded as data and checked
here, tests that cannot be split rejected with their name, and expected values kept out of the sandbox."""
import json

import pytest

from alignment.rewards import sandbox, verdict

FAST = sandbox.Limits(cpu_seconds=1, wall_seconds=3, memory_bytes=256 << 20)
FIXTURE = "tests/fixtures/eval/humaneval_small.jsonl"


def _case(statement):
    (test,) = verdict.code_suite(statement, "prompt 'p'").tests
    (case,) = test.cases
    return case


@pytest.mark.parametrize("statement, call, holds, fails", [
    ("assert f(1, 2) == 3", "f(1, 2)", [3, 3.0, True + 2], [4, "3", None]),
    ("assert 3 == f(1)", "f(1)", [3], [2]),
    ("assert f(1) != 3", "f(1)", [2], [3]),
    ("assert f(1) < 2", "f(1)", [1], [2]),
    ("assert 2 < f(1)", "f(1)", [3], [2]),  # reflected: the constant on the left
    ("assert f(1) in (1, 2)", "f(1)", [1], [3]),
    ("assert 2 in f(1)", "f(1)", [[2, 3]], [[3]]),
    ("assert f(1) is None", "f(1)", [None], [0, False]),
    ("assert f(1) is not True", "f(1)", [1, False], [True]),
    ("assert f(1)", "f(1)", [1, [0]], [0, []]),
    ("assert not f(1)", "f(1)", [0, ""], [1]),
    ("assert abs(f(1) - 0.3) < 1e-6", "f(1)", [0.3000001], [0.31]),
    ("assert abs(0.5 - f(1)) <= 0.25", "f(1)", [0.75, 0.25], [0.76]),
    ("assert 1e-6 > abs(f(1) - 2.0 / 3.0)", "f(1)", [0.6666667], [0.67]),  # arithmetic in the expected value
    ("assert math.isclose(f(1), 2.0, rel_tol=0.01)", "f(1)", [2.01], [2.1]),
    ("assert set(f(1)) == set((4, 5))", "f(1)", [[5, 4, 4], (4, 5)], [[4]]),  # normalizer applied here
    ("assert sorted(f(1), reverse=True) == [3, 1]", "f(1)", [[1, 3]], [[3]]),
    ("assert round(f(1), 2) == 6.0", "f(1)", [6.001], [6.01]),
    ("assert len(m.f(1)) == 2", "m.f(1)", [[0, 0], "ab"], [[]]),  # a dotted name
    ("assert f(g(1), x=[i for i in range(3)]) == float('inf')", "f(g(1), x=[i for i in range(3)])",
     [float("inf")], [1e308]),
])
def test_asserts_split_into_a_call_and_a_check_made_here(statement, call, holds, fails):
    case = _case(statement)
    assert case.call == call
    assert all(case.holds(v) for v in holds) and not any(case.holds(v) for v in fails)


@pytest.mark.parametrize("statement, why", [
    ("assert f(1) == f(2)", "neither side is a constant"),
    ("assert f(1) == y", "neither side is a constant"),
    ("assert all(f(i) == i for i in range(3))", "is not a call of a function of the solution"),
    ("assert f(1).startswith('a')", "is not a call of a function of the solution"),
    ("assert sorted(f(1), key=len) == [1]", "sorted(...) takes arguments other than constants"),
    ("assert 0 < f(1) < 2", "chained comparison"),
    ("assert f(1) is 3", "`is` compares with something other than None"),
    ("assert False", "asserts a false constant"),
    ("x = 3\nassert f(x) == 3", "not an assert or an import"),
    ("for i in range(3):\n    assert f(i) == i", "not an assert or an import"),
])
def test_tests_that_cannot_be_split_are_errors_naming_them(statement, why):
    with pytest.raises(ValueError, match=r"prompt 'p', test 1: line \d+: cannot split") as error:
        verdict.code_suite(statement, "prompt 'p'")
    assert why in str(error.value) and "supported:" in str(error.value)


def test_humaneval_tests_parse_and_keep_their_format():
    records = [json.loads(line) for line in open(FIXTURE)]
    for record in records:
        suite = verdict.humaneval_suite(record["test"], record["entry_point"], record["task_id"])
        assert suite.alias == ("candidate", record["entry_point"]) and len(suite.tests) == 1
    test = ("METADATA = {'author': 'jt'}\nimport math\n\ndef check(f):\n    '''doc'''\n    assert True, 'always'\n"
            "    assert f(2) == 4\n    assert abs(f(1.5) - 2.25) < 1e-6\n")
    suite = verdict.humaneval_suite(test, "square", "t/9")
    assert suite.setup == ("import math",) and suite.alias == ("f", "square")
    assert [c.call for c in suite.tests[0].cases] == ["f(2)", "f(1.5)"]  # `assert True` checks nothing
    with pytest.raises(ValueError, match=r"t/9: line 2: cannot split .* is not a call of f"):
        verdict.humaneval_suite("def check(f):\n    assert g(2) == 4\n", "square", "t/9")
    with pytest.raises(ValueError, match="t/9: the test must define exactly one check"):
        verdict.humaneval_suite("def check(f, g):\n    assert f(2) == 4\n", "square", "t/9")
    with pytest.raises(ValueError, match="t/9: line 1: unexpected `print"):
        verdict.humaneval_suite("print(1)\ndef check(f):\n    assert f(2) == 4\n", "square", "t/9")


def test_returned_values_come_back_as_data_of_their_type():
    solution = ("import collections, enum\nclass Color(enum.IntEnum):\n    RED = 1\nPoint = collections.namedtuple"
                "('Point', 'x y')\nVALUES = [(1, 2), {3, 4}, frozenset({5}), {(1, 2): [b'a'], 'k': None}, 1 + 2j,\n"
                "          float('nan'), -0.0, Color.RED, Point(1, 2), collections.OrderedDict(a=1), 'é\\n', True]\n"
                "def f(i):\n    return VALUES[i]\n")
    expected = ["(1, 2)", "{3, 4}", "frozenset({5})", "{(1, 2): [b'a'], 'k': None}", "complex(1, 2)", None, "-0.0",
                "1", "(1, 2)", "{'a': 1}", "'é\\n'", "True"]
    tests = [f"assert f({i}) == {e}" if e else f"assert not f({i}) == f({i})" for i, e in enumerate(expected)]
    tests[5] = "assert f(5) != 0.0"  # NaN equals nothing
    outcome = verdict.judge(solution, verdict.code_suite(tests, "types"), FAST)
    assert outcome.status == "passed", outcome.reason
    # A list is not a tuple, an object is not plain data.
    suite = verdict.code_suite(["assert f(0) == [1, 2]", "assert f(1) == 1"], "types")
    outcome = verdict.judge("def f(i):\n    return (1, 2) if i == 0 else object()", suite, FAST)
    assert outcome.passed == 0 and "got (1, 2)" in outcome.reason
    assert "type object, which is not plain data" in verdict.judge("def f(i):\n    return object()",
                                                              verdict.code_suite("assert f(1) == 1", "o"),
                                                              FAST).reason


@pytest.mark.parametrize("stdout, error", [
    ("not json\n", "line 1 is not JSON"),
    ('[0, "value", 1]\n[0, "value", 1]\n', "line 2 is not a new result record"),
    ('[5, "value", 1]\n', "line 1 is not a new result record"),  # no such call
    ('[true, "value", 1]\n', "line 1 is not a new result record"),
    ('[0, "error", 1]\n', "line 1 is not a new result record"),
    ("[" * 100000 + "]" * 100000, "line 1 is not JSON"),  # nesting deeper than the decoder goes
])
def test_malformed_results_are_rejected(stdout, error):
    with pytest.raises(ValueError, match=error):
        verdict._outcomes(stdout, 2)


@pytest.mark.parametrize("data", [{"tuple": 1}, {"set": [[1]]}, {"dict": [[[1], 2]]}, {"object": []},
                                  {"complex": [True, 1]}, {"a": 1, "b": 2}, {"bytes": "zz"}])
def test_undecodable_data_fails_its_case(data):
    case = _case("assert f(1) == 1")
    assert "malformed data" in verdict._check(case, ("value", data))


def test_expected_values_never_enter_the_sandbox(monkeypatch):
    seen = []
    real = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda program, *a, **k: seen.append(program) or real(program, *a, **k))
    suite = verdict.code_suite(["assert add(1, 2) == 987654321", "import math\nassert math.isclose(add(2, 2), 4.75)",
                                {"stdin": "1 2", "stdout": "123456789"}], "secret")
    outcome = verdict.judge("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(3)", suite, FAST)
    assert outcome.passed == 0 and outcome.total == 3 and len(seen) == 2
    assert "add(1, 2)" in seen[0] and "import math" in seen[0]
    assert not any(secret in program for program in seen for secret in ("987654321", "4.75", "123456789"))


def test_stdin_tests_compare_printed_lines():
    suite = verdict.code_suite([{"stdin": "3\n", "stdout": "1\n2\n3"}, {"stdin": "2\n", "stdout": "1\n3\n"}], "io")
    outcome = verdict.judge("for i in range(int(input())):\n    print(i + 1, end='  \\n')", suite, FAST)
    assert (outcome.passed, outcome.total) == (1, 2) and outcome.reason.startswith("test 2: printed '1  \\n2  \\n'")
