"""The commit point under signals and races, with real processes.

SIGINT at many moments of a ``prune`` run, SIGKILL at many moments, ``--force`` over an existing output, and
two processes writing the same ``-o`` at once. Afterwards there must be exactly one complete output or the
previous one (or none, if there was none), never a partial one, and the message must say what happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpus import Ctx
from test_corpus import leftovers

from safeprune.adapter import load_adapter

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "SAFEPRUNE_THREADS": "1"}
ENTRY = "from safeprune.console import main; main()"


def _start(c: Ctx, top: int = 2, force: bool = False) -> subprocess.Popen:
    args = [a for a in c.prune() if a not in ("--top", "2")] + ["--top", str(top)] + (["--force"] if force else [])
    return subprocess.Popen(
        [sys.executable, "-c", ENTRY, "-q", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


def _complete(out: Path) -> int | None:
    """The number of modules the output pruned if it is a complete adapter, else None."""
    try:
        load_adapter(out)
        man = json.loads((out / "safeprune.json").read_text())
    except Exception:
        return None
    return len(man["edit"]["modules"])


def _full_run_seconds(c: Ctx) -> float:
    t0 = time.monotonic()
    p = _start(c)
    p.communicate(timeout=300)
    assert p.returncode == 0
    return time.monotonic() - t0


def test_sigint_at_many_moments(tmp_path):
    c = Ctx(tmp_path).valid()
    full = _full_run_seconds(c)
    os.system(f"rm -rf '{c.out}'")
    outcomes = []
    for k in range(8):
        p = _start(c)
        time.sleep(full * (0.35 + 0.65 * k / 7))  # start-up, scoring, writing, committing
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert "Traceback" not in err
        if p.returncode == 0:
            assert _complete(c.out) == 2
        else:
            assert p.returncode == 130, (k, p.returncode, err)
            if "no output was written" in last:
                assert not c.out.exists(), last
            else:
                assert "the output was already complete" in last and _complete(c.out) == 2, last
        assert leftovers(c.out.parent) == [], err
        outcomes.append((p.returncode, c.out.exists()))
        os.system(f"rm -rf '{c.out}'")
    assert any(code == 130 for code, _ in outcomes)  # the signal did land during the run sometimes


def test_sigint_with_force_keeps_the_old_output_or_the_new_one(tmp_path):
    c = Ctx(tmp_path).valid()
    full = _full_run_seconds(c)  # the old output: 2 modules pruned
    for k in range(5):
        p = _start(c, top=3, force=True)
        time.sleep(full * (0.5 + 0.5 * k / 4))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        n = _complete(c.out)
        assert n in (2, 3), err
        if p.returncode == 130 and "no output was written" in err:
            assert n == 2
        if n == 3:  # the new output landed: put the old one back for the next trial
            os.system(f"rm -rf '{c.out}'")
            _full_run_seconds(c)
        assert leftovers(c.out.parent) == []


def test_sigkill_never_leaves_a_partial_output(tmp_path):
    c = Ctx(tmp_path).valid()
    full = _full_run_seconds(c)
    os.system(f"rm -rf '{c.out}'")
    for k in range(5):
        p = _start(c)
        time.sleep(full * (0.4 + 0.6 * k / 4))
        p.kill()
        p.communicate(timeout=300)
        assert not c.out.exists() or _complete(c.out) == 2
        os.system(f"rm -rf '{c.out}'")


def test_concurrent_writers_to_one_output(tmp_path):
    c = Ctx(tmp_path).valid()
    for _ in range(3):
        ps = [_start(c, top=2), _start(c, top=3)]
        results = [(p.returncode, p.communicate(timeout=300)[1]) for p in ps]
        results = [(p.returncode, err) for p, (_, err) in zip(ps, results)]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        assert "already exists" in loser or "appeared while this command ran" in loser, loser
        winner_top = 2 if ps[0].returncode == 0 else 3
        assert _complete(c.out) == winner_top
        assert leftovers(c.out.parent) == []
        os.system(f"rm -rf '{c.out}'")
