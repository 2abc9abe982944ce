"""CLI of the pair methods: scan --method all (comparison + agreement), project, prune --method splora,
and the pair errors (different architecture / shapes, missing tensors, the same model twice)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import make_model
from pairs import perturb_model
from safeprune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory, llama_dir):
    return perturb_model(llama_dir, tmp_path_factory.mktemp("pair") / "unaligned", scale=0.02, rank=3)


def _run(*args):
    return runner.invoke(app, ["-q", *map(str, args)])


def test_scan_all_table_and_agreement(tmp_path, llama_dir, llama_adapter, unaligned_dir):
    js = tmp_path / "all.json"
    res = runner.invoke(
        app,
        [
            "scan",
            str(llama_adapter),
            "--base",
            str(llama_dir),
            "--aligned",
            str(llama_dir),
            "--unaligned",
            str(unaligned_dir),
            "--method",
            "all",
            "--null-samples",
            "8",
            "--json",
            str(js),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "agreement" in res.output and "Spearman" in res.output and "Kendall" in res.output
    d = json.loads(js.read_text())
    assert set(d["methods"]) == {"ddi", "safelora", "splora"}
    for col in ("rank_ddi", "rank_safelora", "rank_splora", "cos", "ediem", "ddi"):
        assert col in d["columns"]
    agr = d["meta"]["agreement"]
    assert {(a["a"], a["b"]) for a in agr} == {("ddi", "safelora"), ("ddi", "splora"), ("safelora", "splora")}
    from scipy.stats import kendalltau, spearmanr

    for a in agr:
        ra = [r[f"rank_{a['a']}"] for r in d["rows"]]
        rb = [r[f"rank_{a['b']}"] for r in d["rows"]]
        assert a["spearman"] == pytest.approx(spearmanr(ra, rb)[0])
        assert a["kendall"] == pytest.approx(kendalltau(ra, rb)[0])
        assert -1 <= a["spearman"] <= 1 and 0 <= a["top_overlap"] <= 10


def test_scan_all_needs_every_model(llama_adapter, llama_dir):
    res = _run("scan", llama_adapter, "--base", llama_dir, "--method", "all")
    assert res.exit_code == 2 and "--aligned" in res.output


def test_project_cli_writes_loadable_adapter(tmp_path, llama_dir, llama_adapter, unaligned_dir):
    from peft import PeftModel

    from helpers import load_model

    out = tmp_path / "proj"
    res = _run(
        "project",
        llama_adapter,
        "--aligned",
        llama_dir,
        "--unaligned",
        unaligned_dir,
        "--method",
        "safelora",
        "--threshold",
        "0.5",
        "-o",
        out,
    )
    assert res.exit_code == 0, res.output
    man = json.loads((out / "safeprune.json").read_text())
    assert man["action"] == "project" and man["selection"]["rule"]["threshold"] == 0.5
    assert all(m["cos"] <= 0.5 for m in man["modules"] if m["action"] == "project")
    assert all(m["cos"] > 0.5 for m in man["modules"] if m["action"] == "kept")
    PeftModel.from_pretrained(load_model(llama_dir), str(out))


def test_project_refuses_other_methods(tmp_path, llama_dir, llama_adapter, unaligned_dir):
    res = _run(
        "project",
        llama_adapter,
        "--aligned",
        llama_dir,
        "--unaligned",
        unaligned_dir,
        "--method",
        "splora",
        "-o",
        tmp_path / "x",
    )
    assert res.exit_code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("method,extra", [("splora", []), ("splora", ["--splora-mode", "official"]), ("safelora", [])])
def test_prune_pair_methods(tmp_path, llama_dir, llama_adapter, unaligned_dir, method, extra):
    out = tmp_path / "pruned"
    res = _run(
        "prune",
        llama_adapter,
        "--aligned",
        llama_dir,
        "--unaligned",
        unaligned_dir,
        "--method",
        method,
        "--top",
        "3",
        "--null-samples",
        "8",
        "-o",
        out,
        *extra,
    )
    assert res.exit_code == 0, res.output
    man = json.loads((out / "safeprune.json").read_text())
    n_pruned = sum(m["action"] == "pruned" for m in man["modules"])
    if extra:  # official HEAD rule: all but the K-1 highest
        assert n_pruned == len(man["modules"]) - 3 + 1
    else:
        assert n_pruned == 3


def test_pair_different_architecture(tmp_path, llama_dir, llama_adapter):
    other = make_model(tmp_path / "wide", "llama", layers=2, hidden=96, seed=1)
    out = tmp_path / "o"
    res = _run("project", llama_adapter, "--aligned", llama_dir, "--unaligned", other, "-o", out)
    assert res.exit_code == 2
    assert "differ in architecture" in res.output and "hidden_size" in res.output
    assert str(other) in res.output.replace("\n", "") and not out.exists()


def test_pair_shape_mismatch_names_both_files(tmp_path, llama_dir, llama_adapter):
    # same config.json, but one tensor of a different shape
    from safetensors.torch import load_file, save_file

    un = perturb_model(llama_dir, tmp_path / "un", scale=0.01)
    sd = load_file(str(un / "model.safetensors"))
    sd["model.layers.1.self_attn.v_proj.weight"] = sd["model.layers.1.self_attn.v_proj.weight"][:16].contiguous()
    save_file(sd, str(un / "model.safetensors"), metadata={"format": "pt"})
    res = _run("scan", llama_adapter, "--aligned", llama_dir, "--unaligned", un, "--method", "safelora")
    assert res.exit_code == 2
    flat = res.output.replace("\n", "")
    assert "model.layers.1.self_attn.v_proj" in flat and "unaligned tensor" in flat and str(un) in flat


def test_pair_missing_tensor(tmp_path, llama_dir, llama_adapter):
    un = perturb_model(llama_dir, tmp_path / "un", scale=0.01, drop=("model.layers.0.self_attn.k_proj.weight",))
    out = tmp_path / "o"
    res = _run("prune", llama_adapter, "--aligned", llama_dir, "--unaligned", un, "--method", "splora", "-o", out)
    assert res.exit_code == 2 and "unaligned model has no weight" in res.output and not out.exists()


def test_pair_same_model_twice(tmp_path, llama_dir, llama_adapter):
    res = _run("scan", llama_adapter, "--aligned", llama_dir, "--unaligned", llama_dir, "--method", "safelora")
    assert res.exit_code == 2 and "same model" in res.output


def test_pair_adapter_shape_mismatch(tmp_path, llama_adapter):
    a = make_model(tmp_path / "a", "llama", layers=2, hidden=96, seed=0)
    u = perturb_model(a, tmp_path / "u", scale=0.01)
    res = _run("scan", llama_adapter, "--aligned", a, "--unaligned", u, "--method", "safelora")
    assert res.exit_code == 2 and "shape" in res.output


def test_pair_dtype_mismatch(tmp_path, llama_dir, llama_adapter):
    import torch
    from safetensors.torch import load_file, save_file

    un = perturb_model(llama_dir, tmp_path / "un", scale=0.01)
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(str(un / "model.safetensors")).items()}
    save_file(sd, str(un / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    res = _run("project", llama_adapter, "--aligned", llama_dir, "--unaligned", un, "-o", out)
    assert res.exit_code == 2 and "BF16" in res.output and "F32" in res.output and not out.exists()


def test_pair_sharded_sources_give_the_same_scores(tmp_path, llama_dir, llama_adapter, unaligned_dir):
    """A sharded aligned model (index + shards) scores exactly like the single-file one."""
    import safeprune
    from helpers import make_model

    sharded = make_model(tmp_path / "sharded", "llama", layers=2, seed=0, shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ref = safeprune.scoring.scan(
        llama_adapter,
        None,
        "safelora,splora",
        aligned=llama_dir,
        unaligned=unaligned_dir,
        options={"splora": {"null_samples": 8}},
    )
    got = safeprune.scoring.scan(
        llama_adapter,
        None,
        "safelora,splora",
        aligned=sharded,
        unaligned=unaligned_dir,
        options={"splora": {"null_samples": 8}},
    )
    assert got.column("cos") == ref.column("cos") and got.column("ediem") == ref.column("ediem")
