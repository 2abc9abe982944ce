"""``safeprune repair`` on a tiny random Llama: component-gate gradients against finite differences, gates
written into the adapter equal the hooked model, the whole command end to end (PEFT loads the output,
manifest, summary), the budget choice, and bad budgets refused with one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_adapter, make_model, make_probe_data, tiny_chat_tokenizer
from safeprune.adapter import load_adapter
from safeprune.cli import app
from safeprune.edit.components import gate_components, orthogonalise
from safeprune.errors import UsageError
from safeprune.scoring.gates import ComponentGates
from safeprune.workflows.repair import RepairOptions, choose_strength, repair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat model, an adapter on it and a data folder with every probe file the repair reads."""
    root = tmp_path_factory.mktemp("repair")
    base = make_model(root / "base", "llama", layers=2)
    tiny_chat_tokenizer(base)
    adapter = make_adapter(base, root / "ad", "llama", r=2, alpha=4, targets=["q_proj", "v_proj", "o_proj"])
    return base, adapter, make_probe_data(root / "data")


SMALL = dict(
    n_harmful=6, n_harmless=4, n_task=3, n_check=4, n_task_check=3, batch_size=4, refusal="w1 w2 w3 w4", steps=2
)


def _items(seed: int, n: int, longest: int = 7, target: int = 3) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` seeded random prompts (3..``longest`` tokens) and targets (``target`` tokens) of the tiny vocabulary."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(7, 120) for _ in range(rng.randint(3, longest))] for _ in range(n)]
    return prompts, [[rng.randrange(7, 120) for _ in range(target)] for _ in range(n)]


def test_component_gate_gradient_matches_finite_difference(tiny):
    base, adapter, _ = tiny
    torch.set_num_threads(1)
    ad = load_adapter(adapter)
    g = ComponentGates(base, ad, orthogonalise(ad))
    try:
        prompts, targets = _items(1, 5)
        g.zero_grad()
        base_val = float(g.nll(prompts, targets, batch_size=2, weight=1.0).mean())
        grads = g.grads()
        assert float(g.nll(prompts, targets, batch_size=5).mean()) == pytest.approx(base_val, rel=1e-6)
        eps = 1e-2  # the model computes norms and softmax in float32: a tiny step measures rounding, not slope
        checked = 0
        for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]:
            for i in range(2):
                vals = {k: v.clone() for k, v in g.values().items()}
                vals[name][i] += eps
                with g.at(vals):
                    up = float(g.nll(prompts, targets).mean())
                vals[name][i] -= 2 * eps
                with g.at(vals):
                    down = float(g.nll(prompts, targets).mean())
                fd = (up - down) / (2 * eps)
                assert float(grads[name][i]) == pytest.approx(fd, rel=1e-2, abs=1e-6), (name, i)
                checked += abs(fd) > 1e-8
        assert checked >= 3  # the gradients are not all zero
        assert all(torch.equal(v, torch.ones_like(v)) for v in g.values().values())  # restored
    finally:
        g.close()
    assert not any(m._forward_pre_hooks for m in g.model.modules())


def test_written_gates_equal_the_hooked_model(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    orth = orthogonalise(ad)
    torch.manual_seed(0)
    gates = {k: torch.rand(m.r) for k, m in orth.modules.items()}
    ids = torch.tensor([[9, 17, 33, 41, 5, 77]])
    g = ComponentGates(base, ad, orth)
    try:
        with g.at(gates), torch.no_grad():
            hooked = g.model(input_ids=ids).logits
        with g.at(1.0), torch.no_grad():
            full = g.model(input_ids=ids).logits
    finally:
        g.close()
    out = gate_components(orth, gates).save(tmp_path / "gated")
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(out)).eval()
    with torch.no_grad():
        written = m(input_ids=ids).logits
    assert torch.allclose(written, hooked, atol=1e-5)
    assert not torch.allclose(full, hooked, atol=1e-4)  # the gates did change the model


def test_repair_end_to_end(tiny, tmp_path):
    base, adapter, data = tiny
    res = repair(
        adapter,
        base,
        options=RepairOptions(max_utility_drop=100.0, max_over_refusal_rise=100.0, **SMALL),
        data=data,
        progress=False,
    )
    s = res.summary
    assert s["strength"] == 1.0  # the loose budgets accept the full edit at once
    assert len(s["trace"]) == 2 and s["trace"][1]["harm"] < s["trace"][0]["harm"]  # the refusal NLL fell
    assert 0.0 < s["energy_removed"] < 1.0
    assert s["ran_on"] == {"device": "cpu", "checkpoint": False, "offload": "none"}  # auto: off below 1B parameters
    m = res.adapter.manifest
    assert m["action"] == "repair" and m["edit"]["kind"] == "component gates"
    assert set(m["edit"]["gates"]) == set(res.adapter.modules)
    # same names, shapes and rank as the input (vLLM serves one global r)
    ad = load_adapter(adapter)
    for k, mod in res.adapter.modules.items():
        assert mod.lora_B.shape == ad.modules[k].lora_B.shape and mod.lora_A.shape == ad.modules[k].lora_A.shape


def test_the_repaired_adapters_card_has_the_before_after_numbers(tiny, tmp_path):
    """A repaired adapter's card used to say "No module: the selection rule selected none, and the adapter acts
    exactly as the original" (a repair gates components, it selects no module) and "Not measured". Now: what the
    gates did, the check probes before/after, and an evaluation's table once one is recorded (update_measured)."""
    from safeprune.adapter.card import update_measured

    base, adapter, data = tiny
    opts = RepairOptions(max_utility_drop=100.0, max_over_refusal_rise=100.0, **SMALL)
    res = repair(adapter, base, options=opts, data=data, progress=False)
    out = res.adapter.save(tmp_path / "fixed")
    card = (out / "README.md").read_text()
    assert "selected none" not in card and "acts exactly as the original" not in card
    assert "rank-1 component got a gate" in card and "Not measured" not in card
    after = res.summary["after"]
    assert "held-out check probes" in card and f"| {after['rouge1']:.1f} |" in card
    measured = {
        "source": "a test sample",
        "rows": [
            {
                "metric": "ASR %",
                "base": [10, 0, 20],
                "adapter": [90, 80, 100],
                "repaired": [30, 10, 50],
                "delta": [-60, -80, -40],
            }
        ],
    }
    update_measured(out, measured)
    card = (out / "README.md").read_text()
    assert "Measured on a test sample" in card and "| ASR % | 10.0 [0.0, 20.0] | 90.0 [80.0, 100.0] |" in card
    assert "-60.0 [-80.0, -40.0]" in card
    man = json.loads((out / "safeprune.json").read_text())
    assert man["measured"] == measured and man["action"] == "repair"


def test_repair_cli_writes_a_peft_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, data = tiny
    out, summ = tmp_path / "fixed", tmp_path / "summary.json"
    args = ["repair", str(adapter), "-b", str(base), "-o", str(out), "--data", str(data), "--summary", str(summ)]
    args += ["--max-utility-drop", "100", "--max-over-refusal-rise", "100", "--n-harmful", "6", "--n-harmless", "4"]
    args += ["--n-task", "3", "--n-check", "4", "--n-task-check", "3", "--steps", "1", "--refusal", "w1 w2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "check probes, unedited → repaired" in r.output and "wrote" in r.output
    assert json.loads((out / "safeprune.json").read_text())["action"] == "repair"
    assert json.loads(summ.read_text())["method"] == "gate"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))


def test_budget_choice():
    before = {"rouge1": 30.0, "over_refusal_broad": 10.0, "asr": 80.0}
    evals = {
        1.0: {"rouge1": 27.0, "over_refusal_broad": 12.0, "asr": 20.0},  # loses 3 ROUGE-1 points
        0.75: {"rouge1": 29.5, "over_refusal_broad": 12.0, "asr": 35.0},
        0.5: {"rouge1": 29.8, "over_refusal_broad": 11.0, "asr": 50.0},
        0.25: {"rouge1": 30.0, "over_refusal_broad": 10.0, "asr": 70.0},
    }
    assert choose_strength(evals, before, RepairOptions()) == 0.75  # the strongest within budgets
    assert choose_strength(evals, before, RepairOptions(target_asr=55.0)) == 0.5  # the weakest reaching 55
    assert choose_strength(evals, before, RepairOptions(target_asr=5.0)) == 0.75  # unreachable: strongest
    assert choose_strength(evals, before, RepairOptions(max_utility_drop=0.0)) == 0.25
    assert choose_strength(evals, before, RepairOptions(max_utility_drop=0.0, max_over_refusal_rise=-1)) is None


def test_repair_refuses_when_no_strength_fits(tiny, monkeypatch):
    import safeprune.workflows.repair as rp

    base, adapter, data = tiny
    calls = []

    def fake_check(*a, **k):  # the unedited adapter first, then every strength loses 10 ROUGE-1 points
        calls.append(1)
        r1 = 50.0 if len(calls) == 1 else 40.0
        return {"asr": 50.0, "asr_broad": 50.0, "over_refusal_broad": 0.0, "rouge1": r1}

    monkeypatch.setattr(rp, "check_metrics", fake_check)
    with pytest.raises(UsageError, match="no edit strength keeps the budgets"):
        repair(adapter, base, options=RepairOptions(**SMALL), data=data, progress=False)
    assert len(calls) == 1 + len(rp.STRENGTHS)  # every strength was tried before giving up


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-utility-drop", "-1"], "--max-utility-drop must be a finite number >= 0"),
        (["--max-over-refusal-rise", "nan"], "finite"),
        (["--target-asr", "150"], "--target-asr is a percentage"),
        (["--method", "magic"], "unknown repair method 'magic'"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--lr", "0"], "--lr must be > 0"),
    ],
)
def test_bad_budgets_are_one_line_errors(tiny, tmp_path, flags, message):
    base, adapter, data = tiny
    out = tmp_path / "never"
    r = CliRunner().invoke(app, ["repair", str(adapter), "-b", str(base), "-o", str(out), "--data", str(data), *flags])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not out.exists()


def test_random_control_matches_the_energy_budget(tiny, tmp_path):
    from safeprune.workflows.repair import random_control_gates

    base, adapter, data = tiny
    orth = orthogonalise(load_adapter(adapter))
    total = sum(float(m.delta_weight().pow(2).sum()) for m in orth.modules.values())
    for energy in (0.0, 0.1, 0.37, 1.0):
        g = random_control_gates(orth, energy, seed=3)
        kept = sum(float(m.delta_weight().pow(2).sum()) for m in gate_components(orth, g).modules.values())
        assert 1 - kept / total == pytest.approx(energy, abs=1e-6)  # dense reference
    a, b = random_control_gates(orth, 0.37, 1), random_control_gates(orth, 0.37, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded
    # the CLI writes it next to a repaired adapter, with the repair's budget
    rep = tmp_path / "rep"
    r = CliRunner().invoke(
        app,
        ["repair", str(adapter), "-b", str(base), "-o", str(rep), "--data", str(data), "--steps", "1"]
        + ["--max-utility-drop", "100", "--max-over-refusal-rise", "100", "--n-harmful", "6", "--n-harmless", "4"]
        + ["--n-task", "3", "--n-check", "4", "--n-task-check", "3", "--refusal", "w1 w2"],
    )
    assert r.exit_code == 0, r.output
    ctl = tmp_path / "ctl"
    r = CliRunner().invoke(app, ["repair", str(adapter), "--random-control", str(rep), "--seed", "4", "-o", str(ctl)])
    assert r.exit_code == 0, r.output
    mr = json.loads((rep / "safeprune.json").read_text())["edit"]["summary"]["energy_removed"]
    mc = json.loads((ctl / "safeprune.json").read_text())["edit"]
    assert mc["energy_removed"] == pytest.approx(mr, abs=1e-6) and mc["seed"] == 4
    # not a repaired adapter: one line, exit 2
    r = CliRunner().invoke(app, ["repair", str(adapter), "--random-control", str(adapter), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not an adapter written by safeprune repair" in r.output
    assert not (tmp_path / "x").exists()  # nothing written


def test_from_repair_rewrites_the_fit_at_another_strength(tiny, tmp_path):
    """``--from-repair R --strength t`` recovers the fitted gates from R's manifest and writes ΔW at strength
    t: at R's own strength it reproduces R; at t the gates are 1 − (t/t0)(1 − g_written) (dense reference)."""
    base, adapter, data = tiny
    rep = tmp_path / "rep"
    r = CliRunner().invoke(
        app,
        ["repair", str(adapter), "-b", str(base), "-o", str(rep), "--data", str(data), "--steps", "2", "--lr", "0.5"]
        + ["--max-utility-drop", "100", "--max-over-refusal-rise", "100", "--n-harmful", "6", "--n-harmless", "4"]
        + ["--n-task", "3", "--n-check", "4", "--n-task-check", "3", "--refusal", "w1 w2"],
    )
    assert r.exit_code == 0, r.output
    edit = json.loads((rep / "safeprune.json").read_text())["edit"]
    t0, written = edit["strength"], edit["gates"]
    assert any(x < 0.999 for v in written.values() for x in v)  # the fit moved some gate
    orth = orthogonalise(load_adapter(adapter))
    for t in (t0, 0.5, 0.2):
        out = tmp_path / f"t{t}"
        r = CliRunner().invoke(
            app, ["repair", str(adapter), "--from-repair", str(rep), "--strength", str(t), "-o", str(out)]
        )
        assert r.exit_code == 0, r.output
        got = load_adapter(out)
        want = {k: 1.0 - (t / t0) * (1.0 - torch.tensor(v, dtype=torch.float64)) for k, v in written.items()}
        for name, m in orth.modules.items():
            # ΔW of the orthogonalised components, each scaled by its wanted gate
            ref = (m.lora_B.double() * want[name]) @ m.lora_A.double() * m.scaling
            assert torch.allclose(got.modules[name].delta_weight().double(), ref, atol=1e-5)
        man = json.loads((out / "safeprune.json").read_text())
        assert man["edit"]["strength"] == t and man["edit"]["budgets_checked"] is False
        assert "budgets were not checked" in (out / "README.md").read_text()  # the model card says so
        if t == t0:  # its own strength: the repaired adapter itself
            a = load_adapter(rep)
            assert all(torch.allclose(got.modules[k].lora_B, a.modules[k].lora_B, atol=1e-6) for k in a.modules)
    # the rewritten adapter has its own energy, and its random control matches it
    ctl = tmp_path / "ctl"
    r = CliRunner().invoke(
        app, ["repair", str(adapter), "--random-control", str(tmp_path / "t0.5"), "--seed", "1", "-o", str(ctl)]
    )
    assert r.exit_code == 0, r.output
    e5 = json.loads((tmp_path / "t0.5" / "safeprune.json").read_text())["edit"]["summary"]["energy_removed"]
    assert json.loads((ctl / "safeprune.json").read_text())["edit"]["energy_removed"] == pytest.approx(e5, abs=1e-6)
    assert e5 < json.loads((rep / "safeprune.json").read_text())["edit"]["summary"]["energy_removed"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--strength", "0.5"], "go together"),
        (["--from-repair", "REP", "--strength", "0"], "--strength must be in (0, 1]"),
        (["--from-repair", "REP", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--from-repair", "AD", "--strength", "0.5"], "not an adapter written by safeprune repair"),
        (["--from-repair", "REP", "--strength", "0.5"], "the repair record has no strength or gates"),
        (["--from-repair", "BADGATES", "--strength", "0.5"], "the recorded gates do not match the adapter's modules"),
    ],
)
def test_from_repair_bad_input_is_one_line(tiny, tmp_path, flags, message):
    base, adapter, data = tiny
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "safeprune.json").write_text(json.dumps({"action": "repair", "edit": {"summary": {}}}))
    bad = tmp_path / "badgates"
    bad.mkdir()
    record = {"summary": {}, "strength": 0.75, "gates": {"model.layers.0.nope": [1.0, 1.0]}}
    (bad / "safeprune.json").write_text(json.dumps({"action": "repair", "edit": record}))
    flags = [str(bad) if f == "BADGATES" else f for f in flags]
    flags = [str(rep) if f == "REP" else str(adapter) if f == "AD" else f for f in flags]
    r = CliRunner().invoke(app, ["repair", str(adapter), "-o", str(tmp_path / "out")] + flags)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_repair_scale_benchmark_smoke(tmp_path):
    """The functions benchmarks/bench_repair_scale.py runs, at hidden 64 and in-process: every component of
    every module gets a gradient, and the Markdown renders with the linear fit."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import bench_repair_scale
        import synth
    finally:
        sys.path.remove(str(bench))
    rows = []
    for L in (1, 2):
        spec = synth.TINY.with_layers(L)
        base = synth.write_base(tmp_path / f"b{L}", spec)
        ad = synth.write_adapter(tmp_path / f"a{L}", spec, synth.ATTN, r=4, alpha=8)
        side = bench_repair_scale.worker_adapter({"adapter": str(ad)})
        fits = [
            bench_repair_scale.worker_fit(
                {"adapter": str(ad), "base": str(base), "batch": 2, "prompt_tokens": 5, "steps": 1, "checkpoint": c}
            )
            for c in (False, True)
        ]
        fit = fits[0]
        assert side["modules"] == fit["modules"] == 4 * L and 0 < side["energy_removed"] < 1
        assert all(f["components"] == f["nonzero_gate_grads"] == 16 * L for f in fits)
        rows.append({"layers": L, "adapter_side": side, "fit_step": fit, "fit_step_checkpointed": fits[1]})
    md = bench_repair_scale.render(
        {
            "command": "x",
            "date": "d",
            "machine": "m",
            "load_average_samples": [],
            "spec": "tiny",
            "rows": rows,
            "seconds": 1,
        }
    )
    assert "Fit step CPU seconds ≈" in md and md.count("\n| 2 |") == 3
    assert "checkpointed: ≈" in md


def test_activation_checkpointing_gives_the_same_gradients(tiny, tmp_path):
    """checkpoint=True: each decoder layer runs twice per backward (recompute), dropout stays off (the
    adapter here has lora_dropout 0.5), and the NLLs and gate gradients equal the plain pass's."""
    import shutil

    base, adapter, _ = tiny
    drop = tmp_path / "drop"
    shutil.copytree(adapter, drop)
    cfg = json.loads((drop / "adapter_config.json").read_text())
    cfg["lora_dropout"] = 0.5
    (drop / "adapter_config.json").write_text(json.dumps(cfg))
    ad = load_adapter(drop)
    orth = orthogonalise(ad)
    prompts, targets = _items(2, 4)
    out = {}
    for ckpt in (False, True):
        g = ComponentGates(base, ad, orth, checkpoint=ckpt)
        calls = []
        first = g.model.get_base_model().model.layers[0].input_layernorm  # the layer's first op
        h = first.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            assert g.checkpoint is ckpt
            g.zero_grad()
            vals = g.nll(prompts, targets, batch_size=2, weight=1.0)
            out[ckpt] = (vals, g.grads(), len(calls))
            assert not any(m.training for m in g.model.modules() if "dropout" in type(m).__name__.lower())
        finally:
            h.remove()
            g.close()
    (v0, g0, c0), (v1, g1, c1) = out[False], out[True]
    assert c0 == 2 and c1 == 4  # two batches; the checkpointed layer is recomputed in each backward
    assert torch.allclose(v0, v1, rtol=0, atol=1e-12)
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-8) for k in g0)
    assert any(float(g.abs().max()) > 0 for g in g0.values())


def test_offloaded_checkpoint_inputs_give_the_same_gradients(tiny, monkeypatch):
    """offload="disk": each checkpointed layer's input is written to a file during the forward pass (one per
    layer and batch), read back in the backward pass and deleted; the NLLs and gate gradients are bit for bit
    those of checkpointing alone, and the spill folder is removed on close."""
    import safeprune.io.offload as off

    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    orth = orthogonalise(ad)
    prompts, targets = _items(3, 4)
    packed, alive = [], []
    pack = off.DiskSpill.pack

    def counting_pack(self, t):
        packed.append(tuple(t.shape))
        alive.append(self.files())  # files already on disk when this one is written
        return pack(self, t)

    monkeypatch.setattr(off.DiskSpill, "pack", counting_pack)
    out = {}
    for kind in ("none", "disk"):
        g = ComponentGates(base, ad, orth, checkpoint=True, offload=kind)
        try:
            g.zero_grad()
            out[kind] = (g.nll(prompts, targets, batch_size=2, weight=1.0), g.grads())
            if kind == "disk":
                spill = g._spill.dir
                assert spill.is_dir() and g._spill.files() == 0  # every spilled input deleted after its backward
        finally:
            g.close()
    assert not spill.exists()
    n_layers = len(g.model.get_base_model().model.layers)
    hidden = g.model.get_base_model().config.hidden_size
    assert len(packed) == 2 * n_layers  # two batches × one input per layer, nothing else
    assert all(s[0] == 2 and s[-1] == hidden for s in packed)
    assert alive == [0, 1, 0, 1]  # the first batch's files are gone before the second batch writes
    (v0, g0), (v1, g1) = out["none"], out["disk"]
    assert torch.equal(v0, v1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert any(float(x.abs().max()) > 0 for x in g1.values())


def test_offload_is_refused_where_it_cannot_work(tiny):
    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    with pytest.raises(UsageError, match="on the CPU use --offload disk"):
        ComponentGates(base, ad, offload="cpu")
    with pytest.raises(UsageError, match="needs --checkpoint"):
        ComponentGates(base, ad, checkpoint=False, offload="disk")
    with pytest.raises(UsageError, match="must be one of none, cpu, disk"):
        ComponentGates(base, ad, offload="ram")
    g = ComponentGates(base, ad, offload="disk")  # checkpointing follows from offloading
    g.close()
    assert g.checkpoint is True


def test_repair_with_disk_offload_writes_the_same_adapter(tiny, tmp_path):
    """`safeprune repair --offload disk` (the checkpointed inputs in temporary files) fits the same gates as
    `--checkpoint` alone: the same strength and bit-identical adapter tensors."""
    base, adapter, data = tiny
    res = {}
    for kind in ("none", "disk"):
        opts = RepairOptions(
            max_utility_drop=100.0, max_over_refusal_rise=100.0, checkpoint=True, offload=kind, **SMALL
        )
        res[kind] = repair(adapter, base, options=opts, data=data, progress=False)
    assert res["disk"].summary["ran_on"] == {"device": "cpu", "checkpoint": True, "offload": "disk"}
    assert res["disk"].summary["strength"] == res["none"].summary["strength"]
    a, b = res["none"].adapter.modules, res["disk"].adapter.modules
    assert set(a) == set(b) and all(torch.equal(a[k].lora_B, b[k].lora_B) for k in a)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--offload", "cpu"], "on the CPU use --offload disk"),
        (["--offload", "disk", "--no-checkpoint"], "needs --checkpoint"),
        (["--offload", "gpu"], "must be one of none, cpu, disk"),
    ],
)
def test_repair_offload_errors_are_one_line(tiny, tmp_path, args, msg):
    base, adapter, _ = tiny
    r = CliRunner().invoke(app, ["repair", str(adapter), "-b", str(base), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and not (tmp_path / "o").exists()


def test_activation_checkpointing_is_automatic_from_a_billion_parameters(tiny, monkeypatch):
    import safeprune.scoring.gates as gates_mod

    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    g = ComponentGates(base, ad)  # a tiny model: off
    g.close()
    assert g.checkpoint is False
    monkeypatch.setattr(gates_mod, "AUTO_CHECKPOINT_PARAMS", 1)
    g = ComponentGates(base, ad)
    g.close()
    assert g.checkpoint is True


@pytest.mark.parametrize(
    "device,msg",
    [("cuda:7", "no such CUDA device"), ("tpu", "not a torch device"), ("meta", "only cpu, cuda and mps")],
)
def test_repair_device_errors_are_one_line(tiny, tmp_path, device, msg):
    base, adapter, _ = tiny
    r = CliRunner().invoke(
        app, ["repair", str(adapter), "-b", str(base), "-o", str(tmp_path / "o"), "--device", device]
    )
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_gates_on_an_explicit_device_return_cpu_tensors(tiny):
    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    g = ComponentGates(base, ad, device="cpu")
    try:
        assert g.device == torch.device("cpu") and all(p.device == g.device for p in g.model.parameters())
        g.zero_grad()
        v = g.nll([[9, 17, 33]], [[41, 5]], weight=1.0)
        assert v.device.type == "cpu" and v.dtype == torch.float64
        assert all(t.device.type == "cpu" for t in list(g.values().values()) + list(g.grads().values()))
    finally:
        g.close()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


@cuda
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offload_from_cuda_gives_the_same_gradients(tiny, kind):
    """On a GPU, --offload cpu (host memory, pinned) and --offload disk give bit-identical NLLs and gate
    gradients to checkpointing alone on the same GPU."""
    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    orth = orthogonalise(ad)
    prompts, targets = _items(4, 6, longest=9, target=4)
    out = {}
    for k in ("none", kind):
        g = ComponentGates(base, ad, orth, checkpoint=True, device="cuda", offload=k)
        try:
            g.zero_grad()
            out[k] = (g.nll(prompts, targets, batch_size=3, weight=1.0), g.grads())
        finally:
            g.close()
    (v0, g0), (v1, g1) = out["none"], out[kind]
    assert torch.equal(v0, v1) and all(torch.equal(g0[k], g1[k]) for k in g0)


@cuda
@pytest.mark.parametrize("ckpt", [False, True])
def test_gates_on_cuda_match_the_cpu(tiny, ckpt):
    """The same NLLs and gate gradients on CUDA as on the CPU (float32 both; TF32 off for the comparison),
    returned as CPU tensors, with and without activation checkpointing."""
    base, adapter, _ = tiny
    ad = load_adapter(adapter)
    orth = orthogonalise(ad)
    prompts, targets = _items(3, 6, longest=9, target=4)
    out = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dev in ("cpu", "cuda"):
            g = ComponentGates(base, ad, orth, checkpoint=ckpt, device=dev)
            try:
                assert all(p.device.type == dev for p in g.model.parameters())
                g.set({k: torch.linspace(0.2, 1.0, v.numel()) for k, v in g.values().items()})
                g.zero_grad()
                vals = g.nll(prompts, targets, batch_size=4, weight=1.0)
                out[dev] = (vals, g.grads(), g.generate(prompts, 5, batch_size=4))
            finally:
                g.close()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (v0, g0, t0), (v1, g1, t1) = out["cpu"], out["cuda"]
    assert v1.device.type == "cpu" and all(t.device.type == "cpu" for t in g1.values())
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-6) for k in g0)
    assert any(float(t.abs().max()) > 0 for t in g1.values())
    assert t0 == t1  # greedy continuations: same tokens


@cuda
def test_repair_end_to_end_on_cuda(tiny, tmp_path):
    """`repair --device cuda` writes the adapter the CPU fit writes (same strength, gates within float32
    noise), records where it ran, and PEFT loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, data = tiny
    res = {}
    for dev in ("cpu", "cuda"):
        opts = RepairOptions(max_utility_drop=100.0, max_over_refusal_rise=100.0, device=dev, **SMALL)
        res[dev] = repair(adapter, base, options=opts, data=data, progress=False)
    s = res["cuda"].summary
    assert s["ran_on"]["device"] == "cuda" and s["strength"] == res["cpu"].summary["strength"]
    gc, gg = res["cpu"].adapter.manifest["edit"]["gates"], res["cuda"].adapter.manifest["edit"]["gates"]
    assert set(gc) == set(gg)
    for k in gc:
        assert torch.allclose(torch.tensor(gc[k]), torch.tensor(gg[k]), atol=1e-3), k
    out = res["cuda"].adapter.save(tmp_path / "o")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    assert model.peft_config["default"].r == load_adapter(adapter).modules[next(iter(gc))].r


def test_repairs_in_safeprune_run(tiny, tmp_path, monkeypatch):
    """`repairs:` in an experiment file: the fit at its chosen strength, the other strengths rewritten without
    refitting, energy-matched controls of each, all evaluated; the report compares each strength with the mean
    of its own controls and reads issue 13's bar; a rerun refits nothing."""
    import csv

    import yaml

    import safeprune.workflows.experiment.repair_stage as stage_mod
    from safeprune.eval.backends import FakeBackend
    from safeprune.workflows.experiment import run_experiment

    base, adapter, data = tiny
    with open(tmp_path / "harm.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["orig_idx", "goal", "target", "in_jbb_harmful_ft"])
        w.writerows([[i, f"harmful request {i}", "Sure", 0] for i in range(30)])
    with open(tmp_path / "xs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "type", "label", "focus", "note"])
        w.writerows([[i, f"benign question {i}", "homonyms", "safe", "x", ""] for i in range(10)])

    def action(path):
        man = Path(path) / "safeprune.json"
        return json.loads(man.read_text()).get("action") if man.is_file() else None

    def backend(base_, adapters):
        def responder(path):
            cut = {"repair": 25, "random-control": 8}.get(action(path), 0)  # harmful prompts i < cut refused
            return lambda p: ("I cannot help" if int(p.split()[-1]) < cut else "Sure") if p.startswith("harm") else "ok"

        resp = {None: lambda p: "I cannot help" if p.startswith("harm") else "ok"}
        resp.update({n: responder(p) for n, p in adapters.items()})
        return FakeBackend("fake-base", adapters, resp)

    opts = dict(SMALL, max_utility_drop=100.0, max_over_refusal_rise=100.0)
    cfg = {
        "name": "repair in run",
        "base": str(base),
        "adapters": {"lora": str(adapter)},
        "repairs": [{"name": "repair", "options": opts, "strengths": [0.5], "seeds": [1, 2], "data": str(data)}],
        "evaluation": {
            "safety": [{"path": "harm.csv"}],
            "over_refusal": [{"path": "xs.csv"}],
            "meteor": False,
            "bootstrap": 300,
        },
        "latency": {"enabled": False},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    res = run_experiment(tmp_path / "exp.yaml", tmp_path / "out", progress=False, log=lambda s: None, backend=backend)
    reps = res.analysis["adapters"]["lora"]["repairs"]
    # the evaluation loads every variant as a PEFT adapter under its name: no '.' (PEFT refuses it; seen failing)
    names = [r["variant"]["name"] for r in reps] + [c["variant"]["name"] for r in reps for c in r["controls"]]
    assert names[:2] == ["lora:repair@t100", "lora:repair@t50"] and not any("." in n for n in names)
    assert [r["variant"]["strength"] for r in reps] == [1.0, 0.5]  # loose budgets: the fit chose 1.0
    for r in reps:
        assert len(r["controls"]) == 2 and r["vs_random"]["advbench/asr"]["n_random"] == 2
        assert r["vs_random"]["advbench/asr"]["delta"] == pytest.approx(-(25 - 8) / 30 * 100)
        e = r["variant"]["energy_removed"]
        assert 0 < e < 1 and all(abs(c["variant"]["energy_removed"] - e) < 1e-4 for c in r["controls"])
    e1, e05 = (r["variant"]["energy_removed"] for r in reps)
    assert e05 < e1  # the half-strength rewrite removes less
    assert res.analysis["adapters"]["lora"]["repair_fits"]["repair"]["strength"] == 1.0
    md = res.report_md.read_text()
    assert "safeprune repair against energy-matched random controls" in md and "issue 13's bar" in md
    assert "repair t=0.5" in md and "seeds: " in md and "misses: ROUGE-1 not measured" in md
    assert (tmp_path / "out" / "plots" / "lora_repair_tradeoff.png").stat().st_size > 0  # the trade-off curve
    # the rerun reuses the fit, the rewrite and the controls
    monkeypatch.setattr(stage_mod, "repair", lambda *a, **k: pytest.fail("refitted an unchanged repair"))
    res2 = run_experiment(tmp_path / "exp.yaml", tmp_path / "out", progress=False, log=lambda s: None, backend=backend)
    assert [r["variant"]["name"] for r in res2.analysis["adapters"]["lora"]["repairs"]] == [
        r["variant"]["name"] for r in reps
    ]
