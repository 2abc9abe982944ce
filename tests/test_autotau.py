"""Automatic τ: the knee and MAD rules, select(auto=...), the CLI flag and the score-curve plot."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from safeprune.cli import app
from safeprune.errors import UsageError
from safeprune.scoring.table import MethodInfo, ScoreTable
from safeprune.selection import select
from safeprune.selection.autotau import auto_tau, knee, mad

ELBOW = [100.0 - 10 * i for i in range(6)] + [50.0 - 0.5 * i for i in range(1, 31)]


def test_knee_finds_the_elbow():
    # a steep line down to rank 6, then a long shallow one: the corner is rank 6
    scores = ELBOW
    r = knee(scores, descending=True)
    assert r.tau == 6 and r.details["knee_rank"] == 6
    # ascending scores (SafeLoRA-like): the same shape mirrored
    r2 = knee([-s for s in scores], descending=False)
    assert r2.tau == 6
    # order of the input does not matter
    assert knee(list(reversed(scores)), True).tau == 6


def test_knee_degenerate():
    assert knee([1.0, 2.0], True).tau == 0 and "fewer than 3" in knee([1.0, 2.0], True).details["reason"]
    r = knee([0.5] * 10, True)
    assert r.tau == 0 and "equal" in r.details["reason"]
    assert knee([3.0, 2.0, 1.0, 0.0], True).tau == 0  # a straight line has no knee


def test_mad_counts_planted_outliers():
    import random

    rng = random.Random(0)
    base = [rng.gauss(0.0, 1.0) for _ in range(60)]
    r = mad(base + [12.0, 15.0, 20.0], descending=True, k=3.0)
    assert r.tau == 3 and r.details["cutoff"] > max(base)
    r = mad([-x for x in base] + [-12.0, -15.0, -20.0], descending=False, k=3.0)
    assert r.tau == 3 and r.details["direction"] == "<"
    # scale: MAD * 1.4826 estimates sigma
    big = [rng.gauss(0.0, 2.0) for _ in range(4000)]
    assert abs(mad(big, True).details["mad"] - 2.0) < 0.15
    assert mad([1.0] * 5 + [2.0], True).tau == 0  # MAD = 0
    with pytest.raises(UsageError):
        mad([1.0, 2.0], True, k=0)


def test_nan_is_ignored():
    nan = float("nan")
    scores = list(ELBOW)
    r = knee(scores + [nan, None, nan], True)
    assert r.tau == 6 and r.details["ignored_nan"] == 3 and r.details["n"] == len(scores)
    assert mad([0.0, 0.1, -0.1, 0.05, -0.05, 5.0, nan], True).tau == 1
    assert auto_tau([nan, nan], True, "knee").tau == 0
    with pytest.raises(UsageError):
        auto_tau([1.0], True, "elbow")


def _table(scores, descending=True):
    rows = [
        {
            "module": f"model.layers.{i}.self_attn.o_proj",
            "layer": i,
            "type": "o_proj",
            "r": 4,
            "in": 8,
            "out": 8,
            "scaling": 1.0,
            "s": v,
        }
        for i, v in enumerate(scores)
    ]
    return ScoreTable(rows=rows, methods={"m": MethodInfo(name="m", primary="s", descending=descending, columns=["s"])})


def test_select_auto_records_rule():
    scores = ELBOW + [float("nan")]
    sel = select(_table(scores), "m", auto="knee")
    assert len(sel) == 6 and sel.selected[0] == "model.layers.0.self_attn.o_proj"
    d = sel.to_dict()
    assert d["rule"]["auto"] == "knee" and d["rule"]["auto_tau"] == 6 and d["rule"]["top"] == 6
    assert d["rule"]["auto_details"]["knee_rank"] == 6 and "knee rule" in d["description"]
    sel = select(_table([0.0, 0.1, -0.1, 0.05, -0.05, 0.02, 5.0, 7.0]), "m", auto="mad", mad_k=3)
    assert sel.selected == ["model.layers.7.self_attn.o_proj", "model.layers.6.self_attn.o_proj"]
    with pytest.raises(UsageError, match="only one"):
        select(_table(scores), "m", auto="knee", top=3)
    with pytest.raises(UsageError, match="unknown"):
        select(_table(scores), "m", auto="elbow")


def test_cli_auto_tau_and_scores_file(tmp_path, llama_adapter, llama_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["scan", str(llama_adapter), "--base", str(llama_dir), "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "prune",
            str(llama_adapter),
            "--scores",
            str(tmp_path / "s.json"),
            "--auto-tau",
            "mad",
            "--mad-k",
            "1.0",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "out" / "safeprune.json").read_text())
    rule = man["selection"]["rule"]
    assert rule["auto"] == "mad" and rule["auto_details"]["k"] == 1.0
    assert len(man["selection"]["selected"]) == rule["auto_tau"]
    table = json.loads((tmp_path / "s.json").read_text())
    expect = mad([row["ddi"] for row in table["rows"]], True, 1.0).tau
    assert rule["auto_tau"] == expect
    r = runner.invoke(
        app,
        [
            "prune",
            str(llama_adapter),
            "--scores",
            str(tmp_path / "s.json"),
            "--auto-tau",
            "knee",
            "--top",
            "3",
            "-o",
            str(tmp_path / "out2"),
        ],
    )
    assert r.exit_code == 2 and "only one" in r.output
    # a table of another adapter is refused
    table["rows"] = table["rows"][1:]
    (tmp_path / "bad.json").write_text(json.dumps(table))
    r = runner.invoke(
        app, ["prune", str(llama_adapter), "--scores", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o3")]
    )
    assert r.exit_code == 2 and "not scored" in r.output


def test_score_curve_plot(tmp_path):
    from safeprune.report.plots import score_curve

    scores = ELBOW + [math.nan]
    res = [auto_tau(scores, True, "knee"), auto_tau(scores, True, "mad")]
    p = score_curve(scores, True, res, tmp_path / "c.png", title="t")
    assert p.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))
    score_curve([1.0, 1.0], False, [auto_tau([1.0, 1.0], False, "knee")], tmp_path / "d.png")
