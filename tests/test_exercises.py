"""v4lab.exercises: keys, comparison rules and one-line messages."""
import pytest

from v4lab import exercises
from v4lab.exercises import Answer, _same, check


def test_numeric_tolerances_and_types():
    assert _same(16, Answer(16, ""))
    assert not _same(17, Answer(16, ""))
    assert _same(10.4, Answer(10.0, "", rel_tol=0.05)) and not _same(10.6, Answer(10.0, "", rel_tol=0.05))
    assert _same(0.9, Answer(1.0, "", abs_tol=0.1)) and not _same(0.8, Answer(1.0, "", abs_tol=0.1))
    assert not _same("16", Answer(16, "")) and not _same(float("nan"), Answer(16, ""))
    assert not _same(True, Answer(1, ""))                          # a bool is not a count
    assert _same(True, Answer(True, "")) and not _same(1, Answer(True, ""))


def test_strings_and_collections():
    assert _same(" HCA ", Answer("hca", ""))
    assert _same([3, 1], Answer([1, 3], "", unordered=True)) and not _same([3, 1], Answer([1, 3], ""))
    assert not _same(5, Answer([1, 3], "", unordered=True))


def test_check_prints_one_line_and_registered_answers(capsys, monkeypatch):
    monkeypatch.setattr(exercises, "_EXERCISES", {})
    calls = []

    @exercises.exercise("99.toy")
    def _toy():
        calls.append(1)
        return Answer(2 + 2, "because 2 + 2 = 4")
    monkeypatch.setattr(exercises, "_load", lambda key: exercises._EXERCISES[key])
    assert check("99.toy", 4) and "right" in capsys.readouterr().out
    assert not check("99.toy", 5)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "you said 5" in out and "computes 4" in out and "because" in out
    assert not check("99.toy", None) and "prediction" in capsys.readouterr().out
    assert len(calls) == 3                                          # computed on each check, never cached


@pytest.mark.parametrize("key", ["nope", "ab.x", "02.", 7, "98.missing"])
def test_bad_keys_name_the_key(key):
    with pytest.raises(ValueError, match="exercise key"):
        exercises.answer(key)


def test_registering_a_key_twice_is_refused(monkeypatch):
    monkeypatch.setattr(exercises, "_EXERCISES", {})
    exercises.exercise("99.a")(lambda: Answer(1, ""))
    with pytest.raises(ValueError, match="twice"):
        exercises.exercise("99.a")(lambda: Answer(2, ""))
