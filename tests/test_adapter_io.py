"""Reading PEFT adapters: conventions (scaling, patterns, fan_in_fan_out) checked against PEFT itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import safeprune
from helpers import load_model, make_adapter, make_model, read_config, write_config
from safeprune.adapter import parse_lora_key, pattern_value
from safeprune.errors import InputError, UnsupportedError


def peft_deltas(model_dir, adapter_dir):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(model_dir), adapter_dir)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            dw = mod.get_delta_weight("default")
            if getattr(mod, "fan_in_fan_out", False):
                dw = dw.T
            out[key] = dw.detach().double()
    return out


def check_against_peft(model_dir, adapter_dir):
    ad = safeprune.load_adapter(adapter_dir)
    ref = peft_deltas(model_dir, adapter_dir)
    assert set(ref) == set(ad.modules)
    for name, m in ad.modules.items():
        assert torch.allclose(m.delta_weight(), ref[name], rtol=1e-5, atol=1e-6), name
    return ad


def test_llama_adapter_modules_and_scaling(llama_adapter, llama_dir):
    ad = check_against_peft(llama_dir, llama_adapter)
    assert len(ad) == 14
    m = ad.modules["model.layers.1.mlp.down_proj"]
    assert (m.r, m.alpha, m.scaling, m.layer, m.module_type) == (4, 8.0, 2.0, 1, "down_proj")
    assert (m.out_features, m.in_features) == (64, 160)


def test_rslora_rank_and_alpha_patterns(tmp_path, llama_dir):
    a = make_adapter(
        llama_dir,
        tmp_path / "a",
        "llama",
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={"q_proj": 8, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    ad = check_against_peft(llama_dir, a)
    q = ad.modules["model.layers.0.self_attn.q_proj"]
    assert q.r == 8 and q.scaling == pytest.approx(8 / 8**0.5)
    assert ad.modules["model.layers.1.mlp.up_proj"].r == 2
    assert ad.modules["model.layers.0.mlp.up_proj"].r == 4
    assert ad.modules["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(3 / 2)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base = make_model(tmp_path / "g", "gpt2")
    a = make_adapter(base, tmp_path / "ga", "gpt2")
    ad = check_against_peft(base, a)
    m = ad.modules["transformer.h.0.attn.c_attn"]
    assert m.fan_in_fan_out and (m.out_features, m.in_features) == (192, 64)
    table = safeprune.scoring.scan(ad, base)  # W0 stored (in, out) is transposed to (out, in)
    assert len(table) == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per layer


def test_qwen_with_lora_bias_and_modules_to_save(tmp_path, qwen_dir):
    a = make_adapter(qwen_dir, tmp_path / "qa", "qwen2", lora_bias=True, modules_to_save=["lm_head"])
    ad = check_against_peft(qwen_dir, a)
    assert all(m.lora_B_bias is not None for m in ad)
    assert any("lm_head" in k for k in ad.extra_tensors)


def test_parse_keys_with_adapter_name():
    assert parse_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == (
        "model.layers.0.self_attn.q_proj",
        "lora_A",
        "weight",
    )
    assert parse_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias") == (
        "model.layers.0.self_attn.q_proj",
        "lora_B",
        "bias",
    )
    assert parse_lora_key("base_model.model.lm_head.weight") is None


def test_default_adapter_name_in_keys_is_read(tmp_path, llama_adapter):
    d = tmp_path / "a"
    shutil.copytree(llama_adapter, d)
    sd = load_file(d / "adapter_model.safetensors")
    sd = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in sd.items()
    }
    save_file(sd, d / "adapter_model.safetensors")
    assert len(safeprune.load_adapter(d)) == 14


def test_pattern_rule_is_suffix_regex_first_match():
    pats = {"q_proj": 16, "layers\\.1\\..*": 2}
    assert pattern_value(pats, "model.layers.1.self_attn.q_proj", 8) == 16
    assert pattern_value(pats, "model.layers.1.self_attn.k_proj", 8) == 2
    assert pattern_value(pats, "model.layers.0.self_attn.xq_proj", 8) == 8


def test_dora_refused(tmp_path, llama_dir):
    a = make_adapter(llama_dir, tmp_path / "d", "llama", use_dora=True)
    with pytest.raises(UnsupportedError, match="DoRA"):
        safeprune.load_adapter(a)


def test_pickle_refused_unless_allowed(tmp_path, llama_adapter):
    d = tmp_path / "p"
    shutil.copytree(llama_adapter, d)
    sd = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(sd, d / "adapter_model.bin")
    with pytest.raises(UnsupportedError, match="pickle"):
        safeprune.load_adapter(d)
    ad = safeprune.load_adapter(d, allow_pickle=True)
    assert len(ad) == 14


def test_rank_mismatch_with_config_is_an_error(tmp_path, llama_adapter):
    d = tmp_path / "r"
    shutil.copytree(llama_adapter, d)
    cfg = read_config(d)
    cfg["r"] = 16
    write_config(d, cfg)
    with pytest.raises(InputError, match="rank 4 but adapter_config.json gives r=16"):
        safeprune.load_adapter(d)


def test_save_roundtrip_is_identical(tmp_path, qwen_adapter):
    ad = safeprune.load_adapter(qwen_adapter)
    out = ad.save(tmp_path / "copy")
    a, b = load_file(qwen_adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "adapter_config.json").read_text()) == read_config(qwen_adapter)
