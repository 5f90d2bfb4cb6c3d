"""Predict-then-run exercises: the learner guesses, v4lab computes the answer and says why.

Each notebook's exercises live in ``v4lab/exercises/nbNN.py`` as zero-argument functions registered with
:func:`exercise` under a key ``"NN.name"``; each returns an :class:`Answer` computed with v4lab (never a
typed-in constant), so a wrong formula in the lab shows up as a wrong answer here. A notebook cell holds
only ``check("02.csa_entries", guess)``; the hidden solution cell calls :func:`answer` and asserts the
value against a second, independent route through v4lab, and nbval runs it.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Answer", "exercise", "answer", "check", "keys"]


@dataclass(frozen=True)
class Answer:
    """value: a number, a string, or a collection (compared as a set when ``unordered``); why: one or two
    sentences a learner reads after guessing; rel_tol / abs_tol: how close a numeric guess must be."""
    value: object
    why: str
    rel_tol: float = 0.0
    abs_tol: float = 0.0
    unordered: bool = False


_EXERCISES: dict[str, Callable[[], Answer]] = {}


def exercise(key: str) -> Callable[[Callable[[], Answer]], Callable[[], Answer]]:
    """Register ``fn`` as the answer to exercise ``key`` (``"NN.name"``, NN = the notebook number)."""
    _split(key)

    def register(fn: Callable[[], Answer]) -> Callable[[], Answer]:
        if key in _EXERCISES and _EXERCISES[key] is not fn:
            raise ValueError(f"exercise {key!r}: registered twice")
        _EXERCISES[key] = fn
        return fn
    return register


def _split(key: object) -> tuple[str, str]:
    if not isinstance(key, str) or "." not in key or not key.split(".", 1)[0].isdigit() or not key.split(".", 1)[1]:
        raise ValueError(f"exercise key = {key!r}: must be 'NN.name', NN the notebook number (e.g. '02.csa_entries')")
    nb, name = key.split(".", 1)
    return nb, name


def _load(key: str) -> Callable[[], Answer]:
    nb, _ = _split(key)
    try:
        importlib.import_module(f"v4lab.exercises.nb{nb}")
    except ModuleNotFoundError as e:
        if e.name != f"v4lab.exercises.nb{nb}":
            raise
        raise ValueError(f"exercise key = {key!r}: notebook {nb} has no exercises "
                         f"(no v4lab.exercises.nb{nb})") from None
    if key not in _EXERCISES:
        known = ", ".join(sorted(k for k in _EXERCISES if k.startswith(nb + "."))) or "none"
        raise ValueError(f"exercise key = {key!r}: not an exercise of notebook {nb} (known: {known})")
    return _EXERCISES[key]


def answer(key: str) -> Answer:
    """The answer to exercise ``key``, computed now with v4lab."""
    return _load(key)()


def keys(nb: str) -> list[str]:
    """The exercise keys of notebook ``nb`` (e.g. ``"02"``), in registration order."""
    _load_all(nb)
    return [k for k in _EXERCISES if k.startswith(nb + ".")]


def _load_all(nb: str) -> None:
    try:
        importlib.import_module(f"v4lab.exercises.nb{nb}")
    except ModuleNotFoundError as e:
        if e.name != f"v4lab.exercises.nb{nb}":
            raise


def _same(guess: object, a: Answer) -> bool:
    v = a.value
    if isinstance(v, bool) or isinstance(guess, bool):
        return guess is v if isinstance(v, bool) else False
    if isinstance(v, (int, float)):
        if isinstance(guess, bool) or not isinstance(guess, (int, float)) or not math.isfinite(float(guess)):
            return False
        return math.isclose(float(guess), float(v), rel_tol=a.rel_tol, abs_tol=a.abs_tol)
    if isinstance(v, str):
        return isinstance(guess, str) and guess.strip().lower() == v.strip().lower()
    if a.unordered:
        try:
            return set(guess) == set(v)
        except TypeError:
            return False
    try:
        return list(guess) == list(v)
    except TypeError:
        return False


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return repr(x)


def check(key: str, guess: object) -> bool:
    """Compare the learner's ``guess`` with :func:`answer`; print one line (right / not yet / why) and return
    whether it was right. ``guess = None`` (the notebook's placeholder) asks for a guess first."""
    a = answer(key)
    if guess is None:
        print(f"{key}: write your prediction in `guess` first, then run this cell.")
        return False
    ok = _same(guess, a)
    tol = f" (within {a.rel_tol:.0%})" if a.rel_tol else (f" (within ±{a.abs_tol:g})" if a.abs_tol else "")
    if ok:
        print(f"{key}: right{tol}: {_fmt(a.value)}. {a.why}")
    else:
        print(f"{key}: not yet: you said {_fmt(guess)}, v4lab computes {_fmt(a.value)}{tol}. {a.why}")
    return ok
