"""Pruned adapters load in PEFT and behave exactly like the original with the pruned modules' B = 0."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import safeprune
from helpers import load_model, make_adapter, tree_checksums
from safeprune.errors import OutputExistsError, UsageError


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_logits(base_dir, adapter_dir, zeroed: list[str], ids):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(base_dir), adapter_dir).eval()
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if name.removeprefix("base_model.model.") in zeroed:
                mod.lora_B["default"].weight.zero_()
                if mod.lora_B["default"].bias is not None:
                    mod.lora_B["default"].bias.zero_()
    return logits(pm, ids)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["remove", "zero"])
def test_pruned_adapter_logits_and_bit_identical_tensors(tmp_path, family, mode, request):
    from peft import PeftModel

    base = request.getfixturevalue(f"{'llama' if family == 'llama' else 'qwen'}_dir")
    adapter = make_adapter(base, tmp_path / "a", family, lora_bias=(family == "qwen2"))
    before = tree_checksums(adapter)
    pruned = safeprune.prune(adapter, base, top=3, mode=mode)
    out = pruned.save(tmp_path / "out")
    assert tree_checksums(adapter) == before  # input untouched
    sel = pruned.selection.selected
    assert len(sel) == 3

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    got = logits(PeftModel.from_pretrained(load_model(base), out).eval(), ids)
    want = reference_logits(base, adapter, sel, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # and pruning really changes the output
    from peft import PeftModel as PM

    orig = logits(PM.from_pretrained(load_model(base), adapter).eval(), ids)
    assert not torch.allclose(got, orig, atol=1e-4)

    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k, v in a.items():
        module = k.removeprefix("base_model.model.").split(".lora_")[0]
        if module in sel:
            if mode == "remove":
                assert k not in b
            elif ".lora_B." in k:
                assert torch.count_nonzero(b[k]) == 0
            else:
                assert torch.equal(b[k], v)
        else:
            assert torch.equal(b[k], v) and b[k].dtype == v.dtype  # kept tensors bit-identical
    if mode == "remove":
        assert sorted(cfg["target_modules"]) == sorted(m for m in pruned.modules)
        assert not set(sel) & set(cfg["target_modules"])
    else:
        assert cfg["target_modules"] == json.loads((adapter / "adapter_config.json").read_text())["target_modules"]


def test_manifest_records_everything(tmp_path, llama_adapter, llama_dir):
    pruned = safeprune.prune(llama_adapter, llama_dir, top=2, subspace_dim="2r", seed=7)
    out = pruned.save(tmp_path / "o")
    man = json.loads((out / "safeprune.json").read_text())
    assert man["action"] == "prune" and man["selection"]["description"].startswith("top 2 by ddi")
    assert [s["module"] for s in man["selection"]["selected"]] == pruned.selection.selected
    assert all("rank" in s["reason"] for s in man["selection"]["selected"])
    assert man["scoring"]["ddi"]["options"]["seed"] == 7
    assert man["scoring"]["ddi"]["options"]["subspace_dim"] == "2r"
    assert man["inputs"]["adapter"]["files"][0]["sha256"]
    assert any(f.get("sha256") for f in man["inputs"]["base"]["files"])
    assert man["versions"]["torch"] and man["command_line"]
    actions = {m["module"]: m["action"] for m in man["modules"]}
    assert sum(a == "pruned" for a in actions.values()) == 2 and len(actions) == 14
    assert all("ddi" in m for m in man["modules"])
    assert man["edit"]["modules_after"] == 12


def test_threshold_selection(llama_adapter, llama_dir):
    table = safeprune.scoring.scan(llama_adapter, llama_dir)
    vals = sorted(table.column("ddi"), reverse=True)
    theta = (vals[3] + vals[4]) / 2
    sel = safeprune.select(table, threshold=theta)
    assert len(sel) == 4
    sel_n = safeprune.select(table, threshold_norm=theta / (1 + theta))
    assert sel_n.selected == sel.selected
    only_attn = safeprune.select(table, top=3, module_types="q,k")
    assert {table.row(m)["type"] for m in only_attn.selected} <= {"q_proj", "k_proj"}
    with pytest.raises(UsageError, match="only one"):
        safeprune.select(table, top=3, threshold=0.1)


def test_tie_breaking_is_deterministic(llama_adapter, llama_dir):
    table = safeprune.scoring.scan(llama_adapter, llama_dir)
    for r in table.rows:
        r["ddi"] = 0.5  # all tied: order falls back to layer, then module path
    sel = safeprune.select(table, top=3)
    assert sel.selected == sorted(table.column("module"), key=lambda m: (int(m.split(".")[2]), m))[:3]


def test_output_rules(tmp_path, llama_adapter, llama_dir):
    pruned = safeprune.prune(llama_adapter, llama_dir, top=1)
    out = pruned.save(tmp_path / "o")
    with pytest.raises(OutputExistsError):
        pruned.save(out)
    pruned.save(out, force=True)
    assert not list(tmp_path.glob(".o.safeprune-*"))
    with pytest.raises(UsageError, match="inside the input"):
        pruned.save(llama_adapter / "sub")
    with pytest.raises(UsageError, match="contains the input"):
        pruned.save(llama_adapter.parent, force=True)
    with pytest.raises(UsageError, match="remove all"):
        safeprune.prune(llama_adapter, llama_dir, top=100)
