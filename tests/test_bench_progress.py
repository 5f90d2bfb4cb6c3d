"""Every bench takes ``--no-progress`` (the shared flag of v4lab.progress), and a bar it asks for draws only
on a terminal: piped stderr gets no bar characters."""
import contextlib
import importlib
import io

import pytest

from v4lab import progress
from v4lab.cli import BENCHES


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_has_the_no_progress_flag(name):
    mod = importlib.import_module(f"v4lab.bench.{name}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "--no-progress" in out.getvalue(), f"v4lab bench {name} lacks --no-progress"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bar_draws_with_eta_on_a_tty_and_nothing_otherwise(monkeypatch):
    for stream, wanted, drawn in ((_Tty(), True, True), (_Tty(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr("sys.stderr", stream)
        with progress.bar(4, "bench", wanted, file=stream, mininterval=0) as pb:
            for _ in range(4):
                pb.update(1)
        text = stream.getvalue()
        assert ("bench" in text and "4/4" in text and "<" in text) == drawn, (wanted, text)   # "<" precedes the ETA
        if not drawn:
            assert text == ""
