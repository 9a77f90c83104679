"""Rules the test suite keeps: no test compares a wall-clock duration with a limit, and no
test sleeps in place of waiting for what it expects.

CI runs on a busy 2-core machine, where such a test fails for reasons that have nothing
to do with the code (it already failed the README's test command there). Speed is
measured by the benchmarks (`edge bench ...`) and recorded in BENCHMARKS.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

CLOCKS = {"perf_counter", "monotonic", "time", "process_time", "thread_time", "perf_counter_ns", "monotonic_ns"}


def _is_clock_call(n: ast.AST) -> bool:
    return (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in CLOCKS
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "time")


def timed_asserts(source: str) -> list[int]:
    """Line numbers of asserts that compare a measured duration (clock minus clock) with a number."""
    tree = ast.parse(source)
    clocked: set[str] = set()  # names bound to a clock reading
    durations: set[str] = set()  # names bound to clock minus clock

    def is_clock(n: ast.AST) -> bool:
        return _is_clock_call(n) or (isinstance(n, ast.Name) and n.id in clocked)

    def is_duration(n: ast.AST) -> bool:
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub):
            return is_clock(n.left) and is_clock(n.right)
        return isinstance(n, ast.Name) and n.id in durations

    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            names = {t.id for t in n.targets if isinstance(t, ast.Name)}
            if _is_clock_call(n.value):
                clocked |= names
            elif is_duration(n.value):
                durations |= names
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Assert):
            for c in ast.walk(n.test):
                if isinstance(c, ast.Compare) and any(is_duration(x) for x in [c.left, *c.comparators]) \
                        and any(isinstance(x, ast.Constant) for x in [c.left, *c.comparators]):
                    out.append(n.lineno)
                    break
    return out


def test_the_checker_finds_a_timed_assert():
    src = "import time\nt = time.perf_counter()\nwork()\nassert time.perf_counter() - t < 1.0\n"
    assert timed_asserts(src) == [4]
    assert timed_asserts("t0 = time.monotonic()\nelapsed = time.monotonic() - t0\nassert elapsed < 2\n") == [3]
    assert timed_asserts("assert wait(lambda: len(x) == 2)\n") == []
    assert timed_asserts("t0 = time.time()\nassert p['t'] - t0 == 0.25\n") == []  # a timestamp, not a duration


def test_no_test_asserts_wall_clock_speed():
    here = Path(__file__).parent
    found = {p.name: lines for p in sorted(here.glob("test_*.py")) if (lines := timed_asserts(p.read_text()))}
    assert found == {}, f"tests compare wall-clock time with a limit (move them to a benchmark): {found}"


def bare_sleeps(source: str) -> list[int]:
    """Line numbers of ``time.sleep(...)`` statements outside any loop with no comment on their
    line: a sleep that stands in for waiting on an event (poll for the condition, bounded,
    instead). A sleep inside a poll loop, or one whose comment says why it is pacing or
    settling rather than waiting, is allowed."""
    lines = source.splitlines()
    out: list[int] = []

    def walk(node: ast.AST, in_loop: bool) -> None:
        for c in ast.iter_child_nodes(node):
            loop = False if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else \
                in_loop or isinstance(c, (ast.For, ast.While, ast.AsyncFor))
            if (not in_loop and isinstance(c, ast.Expr) and isinstance(c.value, ast.Call)
                    and isinstance(c.value.func, ast.Attribute) and c.value.func.attr == "sleep"
                    and isinstance(c.value.func.value, ast.Name) and c.value.func.value.id == "time"
                    and "#" not in lines[c.lineno - 1]):
                out.append(c.lineno)
            walk(c, loop)
    walk(ast.parse(source), False)
    return out


def test_the_checker_finds_a_bare_sleep():
    assert bare_sleeps("def t():\n    go()\n    time.sleep(0.2)\n    check()\n") == [3]
    assert bare_sleeps("while not ok():\n    time.sleep(0.05)\n") == []  # a poll
    assert bare_sleeps("time.sleep(0.02)  # pacing: b 20 ms after a\n") == []
    assert bare_sleeps("while x:\n    def f():\n        time.sleep(1)\n") == [3]  # a loop outside does not count


def test_no_test_sleeps_in_place_of_waiting():
    here = Path(__file__).parent
    found = {p.name: lines for p in sorted(here.glob("test_*.py")) if (lines := bare_sleeps(p.read_text()))}
    assert found == {}, f"tests sleep instead of waiting for the condition (poll for it, bounded): {found}"
