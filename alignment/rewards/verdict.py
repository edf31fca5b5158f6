"""Verdicts on untrusted code that the code cannot forge.

Tests are split here, in the caller, into calls and expectations: `assert add(1, 2) == 3` becomes the call
`add(1, 2)`, evaluated in the sandbox, and the check `== 3`, applied here to the value that comes back as data
(tagged JSON, decoded without evaluating anything). Expected values never enter the sandbox, so a program cannot
read, print or report its way to a pass: all it can do is return values, and whatever it writes on the results
channel is checked like an answer. A test that cannot be split is an error naming it; it is never run with a
verdict the program could report itself. The score is counted here from these checks.

Test statements understood (HumanEval `check(candidate)` bodies, MBPP-style lists of asserts):
  assert CALL <op> VALUE  or  assert VALUE <op> CALL   (op: == != < <= > >= in, not in; is / is not with
                                                        True, False or None)
  assert CALL  /  assert not CALL                      (truthiness of the returned value)
  assert abs(CALL - VALUE) < TOL  (or <=)  /  assert math.isclose(CALL, VALUE, rel_tol=.., abs_tol=..)
  import statements (run in the sandbox before the calls), docstrings, `pass`, and a top-level METADATA = ...
CALL is f(args) where f is a (dotted) name that is not a builtin, i.e. a function of the solution (in HumanEval,
the `candidate` parameter), optionally wrapped in NORMALIZERS such as sorted(...) or round(..., 2), which are
applied here to the returned data. VALUE is a constant expression: literals, arithmetic, set()/tuple()/
float('inf') and the like. Stdin tests {"stdin": str, "stdout": str} run the solution as a program and compare
what it printed here, line by line, ignoring trailing whitespace. Tests built with loops, helper functions or
random inputs (a few HumanEval problems) cannot be split and are refused by name.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import json
import math
import operator

from alignment.rewards import sandbox

SUPPORTED = ("supported: assert CALL == VALUE (or != < <= > >= in, not in, is), assert [not] CALL, "
             "assert abs(CALL - VALUE) < TOL, assert math.isclose(CALL, VALUE, ...), imports; CALL calls the "
             "function under test, VALUE is a constant")

# Applied here to a returned value, so the sandbox computes only the call itself.
NORMALIZERS = {f.__name__: f for f in (abs, bool, float, frozenset, int, len, list, max, min, round, set, sorted,
                                        str, sum, tuple)}
_CONSTRUCTORS = {f.__name__: f for f in (bytes, complex, dict, float, frozenset, int, list, set, str, tuple)}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_OPERATORS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
              ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b, "is": operator.is_,
            "is not": operator.is_not}
_BUILTINS = frozenset(dir(builtins))


class _Unsplittable(Exception):
    """A test statement that is not an input/expectation pair; the message says why."""


# --- tests ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One assert: `call` runs in the sandbox; `wrappers` and `check` are applied here to what it returned."""

    source: str  # the assert statement, for reasons
    call: str  # Python expression evaluated in the sandbox
    wrappers: tuple  # ((normalizer name, extra args, keyword args), ...) innermost first
    check: tuple  # ("compare", op, expected, reflected) | ("truth", bool) | ("near", expected, tolerance, inclusive)
    #               | ("isclose", expected, rel_tol, abs_tol)

    def holds(self, value) -> bool:
        for name, args, kwargs in self.wrappers:
            value = NORMALIZERS[name](value, *args, **kwargs)
        kind, *spec = self.check
        if kind == "compare":
            op, expected, reflected = spec
            return bool(_COMPARE[op](expected, value) if reflected else _COMPARE[op](value, expected))
        if kind == "truth":
            return bool(value) is spec[0]
        if kind == "near":
            expected, tolerance, inclusive = spec
            distance = abs(value - expected)
            return bool(distance <= tolerance if inclusive else distance < tolerance)
        expected, rel_tol, abs_tol = spec
        return math.isclose(value, expected, rel_tol=rel_tol, abs_tol=abs_tol)


@dataclasses.dataclass(frozen=True)
class CallTest:
    name: str  # "test 2", "check": names the test in reasons
    cases: tuple[Case, ...]  # the test passes when all hold


@dataclasses.dataclass(frozen=True)
class StdioTest:
    name: str
    stdin: str
    stdout: str  # expected output


@dataclasses.dataclass(frozen=True)
class Suite:
    tests: tuple[CallTest | StdioTest, ...]
    setup: tuple[str, ...] = ()  # the tests' import statements, run in the sandbox after the solution
    alias: tuple[str, str] | None = None  # (name, entry point): HumanEval's check(candidate) calls `candidate`


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: int  # tests passed
    total: int  # tests judged
    reason: str  # why the first failing test failed; "" when all passed

    @property
    def status(self) -> str:
        return "passed" if self.passed == self.total else "failed"


# --- splitting asserts ----------------------------------------------------------------------------------------

class _NotConstant(Exception):
    pass


def _constant(node: ast.AST):
    """The value of a constant expression from trusted test source; raises _NotConstant otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](_constant(e) for e in node.elts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_constant(k): _constant(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _constant(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _ARITHMETIC[type(node.op)](_constant(node.left), _constant(node.right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CONSTRUCTORS
            and not node.keywords):
        return _CONSTRUCTORS[node.func.id](*(_constant(a) for a in node.args))
    raise _NotConstant


def _try_constant(node: ast.AST) -> tuple[bool, object]:
    try:
        return True, _constant(node)
    except (_NotConstant, ArithmeticError, TypeError, ValueError):
        return False, None


def _root_name(node: ast.AST) -> str | None:
    """`f` of f, f.g or f.g.h; None for anything else."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _program_side(node: ast.AST, targets: frozenset[str] | None) -> tuple[str, tuple]:
    """(call evaluated in the sandbox, normalizers applied here) of the side of an assert that calls the code."""
    wrappers = []
    while (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in NORMALIZERS
           and node.args and not isinstance(node.args[0], ast.Starred)):
        extra = [_try_constant(a) for a in node.args[1:]]
        keywords = [(k.arg, _try_constant(k.value)) for k in node.keywords]
        if not all(ok for ok, _ in extra) or not all(name and ok for name, (ok, _) in keywords):
            raise _Unsplittable(f"{node.func.id}(...) takes arguments other than constants")
        wrappers.append((node.func.id, tuple(v for _, v in extra), {name: v for name, (_, v) in keywords}))
        node = node.args[0]
    root = _root_name(node.func) if isinstance(node, ast.Call) else None
    if root is None or root in _BUILTINS or (targets is not None and root not in targets):
        expected = " or ".join(sorted(targets)) if targets else "a function of the solution"
        raise _Unsplittable(f"`{ast.unparse(node)[:60]}` is not a call of {expected}")
    return ast.unparse(node), tuple(reversed(wrappers))


def _near_form(node: ast.AST, targets) -> tuple[str, tuple, object] | None:
    """(call, wrappers, expected) of abs(CALL - VALUE) or abs(VALUE - CALL); None for other shapes."""
    if not (isinstance(node, ast.Call) and ast.unparse(node.func) in ("abs", "math.fabs") and len(node.args) == 1
            and not node.keywords and isinstance(node.args[0], ast.BinOp) and isinstance(node.args[0].op, ast.Sub)):
        return None
    difference = node.args[0]
    for side, other in ((difference.left, difference.right), (difference.right, difference.left)):
        ok, expected = _try_constant(other)
        if ok:
            return (*_program_side(side, targets), expected)
    return None


def _compare_case(source: str, test: ast.Compare, targets) -> Case:
    op = type(test.ops[0])
    for reflected, side, other in ((False, test.left, test.comparators[0]), (True, test.comparators[0], test.left)):
        ok, value = _try_constant(other)
        if not ok:
            continue
        near = _near_form(side, targets)
        # abs(CALL - VALUE) < TOL, also written TOL > abs(CALL - VALUE)
        if near and op in ((ast.Gt, ast.GtE) if reflected else (ast.Lt, ast.LtE)):
            call, wrappers, expected = near
            return Case(source, call, wrappers, ("near", expected, value, op in (ast.LtE, ast.GtE)))
        if op in (ast.Is, ast.IsNot) and not any(value is s for s in (None, True, False)):
            raise _Unsplittable("`is` compares with something other than None, True or False")
        call, wrappers = _program_side(side, targets)
        return Case(source, call, wrappers, ("compare", _OPERATORS[op], value, reflected))
    raise _Unsplittable("neither side is a constant")


def _isclose_case(source: str, test: ast.Call, targets) -> Case:
    options = {"rel_tol": 1e-9, "abs_tol": 0.0}
    for keyword in test.keywords:
        ok, value = _try_constant(keyword.value)
        if keyword.arg not in options or not ok:
            raise _Unsplittable("isclose takes keywords other than constant rel_tol / abs_tol")
        options[keyword.arg] = value
    if len(test.args) == 2:
        for side, other in ((test.args[0], test.args[1]), (test.args[1], test.args[0])):
            ok, expected = _try_constant(other)
            if ok:
                call, wrappers = _program_side(side, targets)
                return Case(source, call, wrappers, ("isclose", expected, options["rel_tol"], options["abs_tol"]))
    raise _Unsplittable("isclose needs the call and one constant")


def _case(statement: ast.Assert, targets) -> Case | None:
    """The case of one assert; None for an assert of a true constant (HumanEval's `assert True`)."""
    source, test = ast.unparse(statement), statement.test
    ok, value = _try_constant(test)
    if ok:
        if value:
            return None
        raise _Unsplittable("asserts a false constant")
    if isinstance(test, ast.Compare):
        if len(test.ops) != 1:
            raise _Unsplittable("chained comparison")
        return _compare_case(source, test, targets)
    if isinstance(test, ast.Call) and ast.unparse(test.func) in ("math.isclose", "isclose"):
        return _isclose_case(source, test, targets)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return Case(source, *_program_side(test.operand, targets), ("truth", False))
    return Case(source, *_program_side(test, targets), ("truth", True))


def _body(statements: list[ast.stmt], targets, setup: list[str], where: str) -> list[Case]:
    cases = []
    for statement in statements:
        try:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                setup.append(ast.unparse(statement))
            elif isinstance(statement, ast.Assert):
                case = _case(statement, targets)
                cases += [case] if case else []
            elif not (isinstance(statement, ast.Pass) or isinstance(statement, ast.Expr)
                      and isinstance(statement.value, ast.Constant)):
                raise _Unsplittable("not an assert or an import")
        except _Unsplittable as e:
            raise ValueError(f"{where}: line {statement.lineno}: cannot split `{ast.unparse(statement)[:100]}` "
                             f"into a call and its expected value ({e}); {SUPPORTED}") from None
    return cases


def _parse(source: str, where: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"{where}: the test does not parse: {e.msg} (line {e.lineno})") from None


def code_suite(tests, where: str) -> Suite:
    """Tests of a code prompt: an assert program, or a list of them and of {"stdin", "stdout"} cases; one test
    per entry (an assert program passes when all its asserts hold). `where` names the prompt in errors."""
    tests = [tests] if isinstance(tests, str) else tests
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError(f"{where}: 'tests' must be a test program or a non-empty list of tests")
    suite, setup = [], []
    for number, test in enumerate(tests, 1):
        name = f"test {number}"
        if isinstance(test, dict) and set(test) == {"stdin", "stdout"} and all(isinstance(v, str)
                                                                               for v in test.values()):
            suite.append(StdioTest(name, test["stdin"], test["stdout"]))
        elif isinstance(test, str):
            cases = _body(_parse(test, f"{where}, {name}").body, None, setup, f"{where}, {name}")
            if not cases:
                raise ValueError(f"{where}, {name}: no asserts to check")
            suite.append(CallTest(name, tuple(cases)))
        else:
            raise ValueError(f"{where}, {name}: a test is an assert program or {{'stdin': str, 'stdout': str}}, "
                             f"got {str(test)[:80]}")
    return Suite(tuple(suite), tuple(dict.fromkeys(setup)))


def humaneval_suite(test: str, entry_point: str, where: str) -> Suite:
    """A HumanEval `test` field: METADATA, imports and `def check(candidate):` with asserts on candidate(...)."""
    checks, setup = [], []
    for statement in _parse(test, where).body:
        if isinstance(statement, ast.FunctionDef) and statement.name == "check":
            checks.append(statement)
        elif (isinstance(statement, ast.Assign) and [ast.unparse(t) for t in statement.targets] == ["METADATA"]
              or isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)):
            continue
        elif isinstance(statement, (ast.Import, ast.ImportFrom)):
            setup.append(ast.unparse(statement))
        else:
            raise ValueError(f"{where}: line {statement.lineno}: unexpected `{ast.unparse(statement)[:80]}` "
                             "next to def check(candidate)")
    args = checks[0].args if len(checks) == 1 else None
    if args is None or len(args.args) != 1 or args.posonlyargs or args.kwonlyargs or args.vararg or args.kwarg:
        raise ValueError(f"{where}: the test must define exactly one check(candidate) with one parameter")
    parameter = args.args[0].arg
    cases = _body(checks[0].body, frozenset({parameter}), setup, where)
    if not cases:
        raise ValueError(f"{where}: check({parameter}) asserts nothing about {parameter}")
    return Suite((CallTest("check", tuple(cases)),), tuple(dict.fromkeys(setup)), (parameter, entry_point))


# --- judging --------------------------------------------------------------------------------------------------

# Runs in the sandbox after `_TASK = "<json>"`: defines the solution (its main block does not run, as its
# __name__ is not "__main__"), runs the tests' imports, then evaluates each call and writes one JSON line
# [index, "value", data] or [index, "error", message] to the original stdout. The solution's own prints go to
# stderr; what it writes on the results channel anyway is checked in the caller like any answer.
_HARNESS = r'''
import json, os

_task = json.loads(_TASK)
_results = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)


def _encode(value):
    """Plain data as JSON; tuples, sets, dicts, bytes and complex numbers tagged; subclasses as their base."""
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    for kind in (tuple, set, frozenset):
        if isinstance(value, kind):
            return {kind.__name__: [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise TypeError(f"returned a value of type {type(value).__name__}, which is not plain data")


_namespace = {"__name__": "solution"}
exec(compile(_task["solution"], "solution.py", "exec"), _namespace)
for _source in _task["setup"]:
    exec(compile(_source, "test.py", "exec"), _namespace)
if _task["alias"]:
    _name, _entry_point = _task["alias"]
    if _entry_point not in _namespace:
        raise NameError(f"the solution defines no {_entry_point!r}")
    _namespace[_name] = _namespace[_entry_point]
for _index, _call in enumerate(_task["calls"]):
    try:
        _line = json.dumps([_index, "value", _encode(eval(_call, _namespace))])
    except Exception as _error:
        _line = json.dumps([_index, "error", f"{type(_error).__name__}: {_error}"[:300]])
    _results.write(_line + "\n")
_results.flush()
'''


def _decode(data):
    """A returned value from its tagged JSON; ValueError/TypeError for anything else (e.g. unhashable keys)."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v) for v in data]
    if isinstance(data, dict) and len(data) == 1:
        (tag, body), = data.items()
        if tag in ("tuple", "set", "frozenset") and isinstance(body, list):
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](_decode(v) for v in body)
        if tag == "dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
            return {_decode(k): _decode(v) for k, v in body}
        if tag == "bytes" and isinstance(body, str):
            return bytes.fromhex(body)
        if (tag == "complex" and isinstance(body, list) and len(body) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in body)):
            return complex(*body)
    raise ValueError(f"not result data: {str(data)[:60]}")


def _outcomes(stdout: str, count: int) -> dict[int, tuple[str, object]]:
    """index -> ("value", data) | ("error", message) from the results channel; ValueError if it is malformed."""
    outcomes = {}
    for number, line in enumerate(stdout.splitlines(), 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(f"line {number} is not JSON") from None
        if not (isinstance(record, list) and len(record) == 3 and type(record[0]) is int
                and 0 <= record[0] < count and record[0] not in outcomes
                and (record[1] == "value" or record[1] == "error" and isinstance(record[2], str))):
            raise ValueError(f"line {number} is not a new result record")
        outcomes[record[0]] = (record[1], record[2])
    return outcomes


def _show(value) -> str:
    try:
        return repr(value)[:100]
    except ValueError:  # an int too long to print
        return f"an unprintable {type(value).__name__}"


def _check(case: Case, outcome: tuple[str, object] | None) -> str:
    """"" when the case holds, else why not."""
    if outcome is None:
        return f"`{case.source}`: no result (the program stopped before this call)"
    kind, data = outcome
    if kind == "error":
        return f"`{case.source}`: raised {data}"
    try:
        value = _decode(data)
    except (ValueError, TypeError, RecursionError) as e:
        return f"`{case.source}`: returned malformed data ({e})"
    try:
        holds = case.holds(value)
    except Exception as e:  # noqa: BLE001 -- a returned value of the wrong type fails its test
        return f"`{case.source}`: got {_show(value)}, which cannot be checked ({type(e).__name__}: {e})"
    return "" if holds else f"`{case.source}`: got {_show(value)}"


def _judge_calls(solution: str, suite: Suite, tests: list[CallTest], limits: sandbox.Limits,
                 backend: str | None) -> dict[str, str]:
    """test name -> reason for each failing call test; all of them run in one sandbox process."""
    cases = [case for test in tests for case in test.cases]
    task = json.dumps({"solution": solution, "setup": list(suite.setup), "alias": suite.alias,
                       "calls": [case.call for case in cases]})
    run = sandbox.run_python(f"_TASK = {task!r}\n{_HARNESS}", limits, backend=backend)
    if not run.passed:
        return {test.name: f"{test.name}: {run.reason}" for test in tests}
    try:
        outcomes = _outcomes(run.stdout, len(cases))
    except ValueError as e:
        return {test.name: f"{test.name}: malformed results ({e})" for test in tests}
    failures, index = {}, 0
    for test in tests:
        for case in test.cases:
            reason = _check(case, outcomes.get(index))
            index += 1
            if reason and test.name not in failures:
                failures[test.name] = f"{test.name}: {reason}"
    return failures


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _judge_stdio(solution: str, test: StdioTest, limits: sandbox.Limits, backend: str | None) -> str:
    run = sandbox.run_python(solution, limits, stdin=test.stdin, backend=backend)
    if not run.passed:
        return f"{test.name}: {run.reason}"
    if _lines(run.stdout) != _lines(test.stdout):
        return f"{test.name}: printed {run.stdout[:100]!r}, which is not the expected output"
    return ""


def judge(solution: str, suite: Suite, limits: sandbox.Limits = sandbox.Limits(),
          backend: str | None = None) -> Verdict:
    """Run `solution` (Python source) against `suite` in the sandbox; every check happens here."""
    calls = [test for test in suite.tests if isinstance(test, CallTest)]
    failures = _judge_calls(solution, suite, calls, limits, backend) if calls else {}
    for test in suite.tests:
        if isinstance(test, StdioTest):
            reason = _judge_stdio(solution, test, limits, backend)
            if reason:
                failures[test.name] = reason
    first = next((failures[test.name] for test in suite.tests if test.name in failures), "")
    return Verdict(len(suite.tests) - len(failures), len(suite.tests), first)
