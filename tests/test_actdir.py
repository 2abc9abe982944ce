"""actdir (refusal-direction attribution) on a tiny random Llama: gate gradients against finite
differences, zero-B modules score 0, the table works with select/prune, probes and the CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from helpers import SHARED, make_adapter, no_base, tiny_chat_tokenizer
from safeprune.adapter import load_adapter
from safeprune.api import prune
from safeprune.cli import app
from safeprune.errors import UsageError
from safeprune.prompts import default_probes, probes_from_file
from safeprune.scoring.attribution import Attribution
from safeprune.scoring.methods.actdir import score_actdir
from safeprune.selection import select


def _ids(n, seed, lo, hi, vocab=(3, 128)):
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


HARMFUL = _ids(6, 1, 3, 9, (3, 64))  # two "kinds" of prompt: different token ranges
HARMLESS = _ids(6, 2, 3, 9, (64, 128))


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory, llama_dir):
    return make_adapter(
        llama_dir,
        tmp_path_factory.mktemp("act") / "adapter",
        "llama",
        r=2,
        alpha=4,
        targets=["q_proj", "v_proj", "o_proj", "down_proj"],
    )


def test_gate_gradient_matches_finite_difference(llama_dir, small_adapter):
    torch.set_num_threads(1)
    ad = load_adapter(small_adapter)
    att = Attribution(llama_dir, ad, HARMFUL, HARMLESS, batch_size=4)
    try:
        att.direction()
        j, score, direct = att.attribute()
        assert abs(att.objective() - j) < 1e-5
        eps = 1e-2
        names = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.down_proj",
        ]
        for name in names:
            with att.gated({name: 1 + eps}):
                jp = att.objective()
            with att.gated({name: 1 - eps}):
                jm = att.objective()
            fd = (jp - jm) / (2 * eps)
            assert score[name] == pytest.approx(-fd, rel=2e-3, abs=1e-6), name
            assert score[name] != 0
        # direct term: defined for residual writers only; for the last layer's down_proj it is exact
        # (its output goes straight into the last h, nothing downstream)
        assert math.isnan(direct["model.layers.0.self_attn.q_proj"])
        last = "model.layers.1.mlp.down_proj"
        assert direct[last] == pytest.approx(score[last], rel=1e-4, abs=1e-7)
        # gates restored
        assert all(float(g.detach()) == 1.0 for g in att.gates.values())
    finally:
        att.close()
    assert not any(m._forward_hooks for m in att.model.modules())


def test_zero_b_scores_zero_and_table_works(tmp_path, llama_dir, small_adapter):
    ad = load_adapter(small_adapter)
    name = "model.layers.1.self_attn.q_proj"
    ad.modules[name].lora_B = torch.zeros_like(ad.modules[name].lora_B)
    zeroed = ad.save(tmp_path / "zeroed")
    table = score_actdir(llama_dir, zeroed, harmful=HARMFUL, harmless=HARMLESS, batch_size=4, validate=4)
    assert table.row(name)["actdir"] == 0.0
    assert {r["module"] for r in table.rows} == set(ad.modules)
    assert table.methods["actdir"].descending and table.meta["probes"] == {}
    lin = table.meta["linearisation"]
    assert len(lin["modules"]) == 4 and -1.0 <= lin["spearman"] <= 1.0
    sel = select(table, "actdir", top=3)
    best = sorted(table.rows, key=lambda r: -r["actdir"])[:3]
    assert sel.selected == [r["module"] for r in best]
    edited = prune(load_adapter(zeroed), table=table, method="actdir", top=3)
    assert len(edited.modules) == len(ad.modules) - 3 and edited.manifest["selection"]["rule"]["method"] == "actdir"
    # JSON round trip through the prune CLI (--scores)
    (tmp_path / "t.json").write_text(table.to_json())
    r = CliRunner().invoke(
        app,
        [
            "prune",
            str(zeroed),
            "--scores",
            str(tmp_path / "t.json"),
            "--method",
            "actdir",
            "--top",
            "2",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "out" / "safeprune.json").read_text())
    assert [x["module"] for x in man["selection"]["selected"]] == sel.selected[:2]


def test_errors(llama_dir, small_adapter):
    with pytest.raises(UsageError, match="at least 2"):
        score_actdir(llama_dir, small_adapter, harmful=HARMFUL[:1], harmless=HARMLESS)
    with pytest.raises(UsageError, match="layers"):
        score_actdir(llama_dir, small_adapter, harmful=HARMFUL, harmless=HARMLESS, layers=[0])


def _data():
    from safeprune.io.datapaths import data_root as data_dir

    try:
        return data_dir()
    except Exception:
        return SHARED / "data"


DATA = _data()
needs_data = pytest.mark.skipif(not (DATA / "harmbench").is_dir(), reason="shared data not available")


@needs_data
def test_default_probes_are_seeded_and_tuning_only():
    h1, l1, info = default_probes(DATA, n=64, seed=0)
    h2, l2, _ = default_probes(DATA, n=64, seed=0)
    assert h1 == h2 and l1 == l2 and len(h1) == 64 and len(l1) == 64
    assert info["harmful"]["harmbench_val"] + info["harmful"].get("strongreject", 0) == 64
    assert info["harmless"] == {"dialogsum_validation": 32, "hotpotqa_dev": 32}
    assert default_probes(DATA, n=64, seed=1)[0] != h1
    with pytest.raises(UsageError, match="evaluation set"):
        probes_from_file(DATA / "advbench" / "harmful_behaviors.csv", "harmful", 8, 0)
    with pytest.raises(UsageError, match="evaluation set"):
        probes_from_file(DATA / "dialogsum" / "test.jsonl", "harmless", 8, 0)
    ps, pinfo = probes_from_file(DATA / "strongreject" / "strongreject_dataset.csv", "harmful", 8, 0)
    assert len(ps) == 8 and pinfo["format"] == "strongreject"


def test_scan_act_cli_with_chat_template(monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    from helpers import make_model
    from safeprune.scoring.attribution import encode

    base = make_model(tmp_path / "base", "llama", layers=2)
    tiny_chat_tokenizer(base)
    adapter = make_adapter(base, tmp_path / "ad", "llama", r=2, targets=["q_proj", "o_proj"])
    tok = AutoTokenizer.from_pretrained(base)
    ids = encode(tok, ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"], max_length=4)[0]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|im_start|>",
        "user",
        "w1",
        "w2",
        "w3",
        "w4",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
    ]
    rng = random.Random(0)
    with open(tmp_path / "harm.csv", "w") as f:
        f.write("orig_idx,category,source,forbidden_prompt,in_jbb_harmful_ft\n")
        for i in range(10):
            f.write(f"{i},c,s,{' '.join(f'w{rng.randrange(0, 60)}' for _ in range(6))},0\n")
    with open(tmp_path / "validation.jsonl", "w") as f:
        for i in range(10):
            f.write(
                json.dumps(
                    {
                        "fname": f"v{i}",
                        "dialogue": " ".join(f"w{rng.randrange(60, 121)}" for _ in range(8)),
                        "summary": "w1",
                        "topic": "t",
                    }
                )
                + "\n"
            )
    import safeprune.io.progress

    monkeypatch.setattr(safeprune.io.progress, "LOG_EVERY", 0.0)  # a line per batch where no bar is drawn
    r = CliRunner().invoke(
        app,
        [
            "scan-act",
            str(adapter),
            "--base",
            str(base),
            "--harmful",
            str(tmp_path / "harm.csv"),
            "--harmless",
            str(tmp_path / "validation.jsonl"),
            "--n-probe",
            "8",
            "--validate",
            "2",
            "-o",
            str(tmp_path / "t.json"),
            "--batch-size",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["methods"]["actdir"]["options"]["chat_template"] is True
    assert t["meta"]["probes"]["harmful"]["n"] == 8 and t["meta"]["probes"]["harmless"]["format"] == "dialogsum"
    assert len(t["rows"]) == 4 and len(t["meta"]["linearisation"]["modules"]) == 2
    # progress: 8 + 8 probes at batch 3 = 6 batches for the direction, 3 for the gradient, 3 × 3 for the check
    err = " ".join(r.stderr.split())
    assert "actdir: refusal direction: 6/6" in err and "actdir: attribution (one backward pass): 3/3" in err
    assert "checking 2 modules by ablation: 9/9" in err
    r = CliRunner().invoke(app, ["scan-act", str(no_base(adapter, tmp_path)), "-o", str(tmp_path / "u.json")])
    assert r.exit_code == 2 and "--base" in r.output
