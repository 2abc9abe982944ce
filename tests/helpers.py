"""Tiny random models and adapters, built offline (the way mergekit's tests do).

``make_model(dir, family)`` saves a 2-4 layer, hidden-64 Llama / Qwen2 (with q/k/v biases) / GPT-2 as
safetensors; ``make_adapter(model_dir, out_dir, ...)`` attaches a PEFT LoRA with random (non-zero) A and B
and saves it with ``save_pretrained``, so every test starts from files PEFT itself wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TESTBED = SHARED / "testbed"
# where ../shared/testbed/build_models.py --out wrote the aligned/unaligned models (slow tests only)
TESTBED_MODELS = Path(__import__("os").environ.get("SAFEPRUNE_TESTBED_MODELS") or SHARED.parent / "models")


def tiny_config(family: str = "llama", layers: int = 2, hidden: int = 64):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=2 * hidden + 32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=2 * hidden + 32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    raise ValueError(family)


def make_model(
    out: Path,
    family: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, hidden)).to(dtype)
    with torch.no_grad():  # make weights non-trivial (default init leaves some at 0/1)
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    kw: dict[str, Any] = {"safe_serialization": True}
    if shard_size:
        kw["max_shard_size"] = shard_size
    model.save_pretrained(out, **kw)
    return Path(out)


DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_adapter(
    model_dir: Path,
    out: Path,
    family: str = "llama",
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | None = None,
    seed: int = 1,
    **lora_kwargs: Any,
) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    model = load_model(model_dir)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or DEFAULT_TARGETS[family],
        init_lora_weights=False,
        lora_dropout=0.0,
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(out)
    return Path(out)


def read_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def write_config(adapter_dir: Path, cfg: dict) -> None:
    (Path(adapter_dir) / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def tree_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove an input was not modified)."""
    import hashlib

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def dict_source(tensors: dict[str, torch.Tensor]):
    """An in-memory WeightSource (tensor name -> tensor) for unit tests."""
    from safeprune.weights import WeightSource

    class DictSource(WeightSource):
        def __init__(self, t):
            self.t = t
            self.description = "memory"

        def keys(self):
            return set(self.t)

        def shape(self, key):
            return tuple(self.t[key].shape)

        def _read(self, key):
            return self.t[key]

    return DictSource(tensors)


def tiny_chat_tokenizer(model_dir: Path) -> None:
    """A word-level tokenizer (w0..w120 + ChatML markers) with a chat template, saved into ``model_dir``:
    enough for transformers' chat/generation code paths on the tiny models above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n"] + [f"w{i}" for i in range(121)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece()
    ft = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    ft.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    ft.save_pretrained(model_dir)


def no_base(adapter_dir: Path, tmp: Path) -> Path:
    """A copy of the adapter whose base_model_name_or_path resolves nowhere (so --base is not defaulted)."""
    import shutil

    out = Path(tmp) / f"{Path(adapter_dir).name}-nobase"
    shutil.copytree(adapter_dir, out)
    cfg = read_config(out)
    cfg["base_model_name_or_path"] = "nobody/not-a-cached-model"
    write_config(out, cfg)
    return out


def _words(rng, lo, hi, n):
    return " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(n))


def make_probe_data(d: Path) -> Path:
    """A data folder holding every probe file the repair reads (HarmBench val, StrongREJECT, HotpotQA, DialogSum
    validation), with random tiny-vocabulary words (w7-w119) for the tiny models."""
    import json
    import random

    rng = random.Random(0)
    (d / "harmbench").mkdir(parents=True)
    with open(d / "harmbench" / "harmbench_behaviors_text_all.csv", "w") as f:
        f.write(
            "orig_idx,BehaviorID,Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,official_split,"
            "in_jbb_harmful_ft\n"
        )
        for i in range(12):
            f.write(f"{i},b{i},{_words(rng, 7, 60, 5)},standard,s,,,val,0\n")
    (d / "strongreject").mkdir()
    with open(d / "strongreject" / "strongreject_dataset.csv", "w") as f:
        f.write("orig_idx,category,source,forbidden_prompt,in_jbb_harmful_ft\n")
        for i in range(12):
            f.write(f"{i},c,s,{_words(rng, 7, 60, 6)},0\n")
    (d / "hotpotqa").mkdir()
    with open(d / "hotpotqa" / "hotpot_dev_v1_simplified.jsonl", "w") as f:
        for i in range(20):
            f.write(
                json.dumps({"orig_idx": i, "question": _words(rng, 60, 120, 5), "answer": "w1", "type": "x"}) + "\n"
            )
    (d / "dialogsum").mkdir()
    with open(d / "dialogsum" / "validation.jsonl", "w") as f:
        for i in range(20):
            row = {
                "fname": f"v{i}",
                "dialogue": _words(rng, 60, 120, 8),
                "summary": _words(rng, 7, 60, 4),
                "topic": "t",
            }
            f.write(json.dumps(row) + "\n")
    return d
