"""The fault corpus: broken and hostile inputs, each with the exact refusal expected.

Every case builds its inputs in a fresh temporary directory (nothing binary is committed): a tiny
hand-written base model (2 layers, hidden 64, q/k/v/o) and a tiny LoRA adapter (r=4), then breaks one thing.
``tests/faults/test_corpus.py`` runs each case through the real CLI and checks the exit code, the single
``error: <file>: <problem>`` line, that no output (and no temporary directory) is left behind and that
the inputs are byte-for-byte unchanged.

Layout inside the case directory ``tmp``::

    tmp/in/adapter   the adapter          tmp/in/base   the base model (model.safetensors + config.json)
    tmp/out/pruned   the output (must not exist afterwards)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

LAYERS = 2
R = 4
PROJ = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}
PREFIX = "base_model.model."
MARKER_NAME = "PWNED"  # a malicious pickle would create this file next to the inputs


def module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.self_attn.{proj}"


# -------------------------------------------------------------------------------------------------
# valid building blocks
# -------------------------------------------------------------------------------------------------


def base_tensors(seed: int = 0, shapes: dict[str, tuple[int, int]] = PROJ, layers: int = LAYERS) -> dict:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(128, 64, generator=g) * 0.05,
        "model.norm.weight": torch.ones(64),
    }
    for i in range(layers):
        for p, shp in shapes.items():
            t[f"{module_name(i, p)}.weight"] = torch.randn(*shp, generator=g) * 0.05
    return t


BASE_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 160,
    "vocab_size": 128,
}


def write_base(d: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else base_tensors(), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config or BASE_CONFIG))
    return d


def adapter_tensors(seed: int = 1, r: int = R, shapes: dict[str, tuple[int, int]] = PROJ, layers: int = LAYERS) -> dict:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for p, (out, inp) in shapes.items():
            t[f"{PREFIX}{module_name(i, p)}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.1
            t[f"{PREFIX}{module_name(i, p)}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    return t


def adapter_config(**over: Any) -> dict:
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": R,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": list(PROJ),
        "base_model_name_or_path": "tiny-llama",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
    }
    cfg.update(over)
    return cfg


def write_adapter(d: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors if tensors is not None else adapter_tensors(),
        str(d / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (d / "adapter_config.json").write_text(json.dumps(config if config is not None else adapter_config()))
    return d


def raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """Write a safetensors file with a header we choose (to forge lies the real writer would not)."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


# -------------------------------------------------------------------------------------------------
# the case record
# -------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    args: list[str]
    file: str | None  # the path (or name) the message must contain; None: nothing to name
    output: Path | None = None  # must not exist afterwards (unless output_preexists)
    output_preexists: bool = False  # then it must be unchanged instead
    patch: Callable[[Any], None] | None = None  # gets pytest's monkeypatch


@dataclass
class Case:
    name: str
    build: Callable[[Path], Setup]
    message: str  # regex searched in the one stderr line
    code: int = 2
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __repr__(self) -> str:
        return self.name


class Ctx:
    """Paths of one case directory plus the default valid inputs."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.adapter = tmp / "in" / "adapter"
        self.base = tmp / "in" / "base"
        self.out = tmp / "out" / "pruned"
        (tmp / "out").mkdir(parents=True, exist_ok=True)

    def valid(self) -> "Ctx":
        write_base(self.base)
        write_adapter(self.adapter)
        return self

    def prune(self, *extra: str, adapter: Path | None = None, base: Path | str | None = None) -> list[str]:
        return [
            "prune",
            str(adapter or self.adapter),
            "--base",
            str(base or self.base),
            "-o",
            str(self.out),
            "--top",
            "2",
            *extra,
        ]

    @property
    def st(self) -> Path:
        return self.adapter / "adapter_model.safetensors"

    @property
    def cfg(self) -> Path:
        return self.adapter / "adapter_config.json"

    @property
    def base_st(self) -> Path:
        return self.base / "model.safetensors"


CASES: list[Case] = []


def case(name: str, message: str, code: int = 2, tags: tuple[str, ...] = ()):
    def deco(fn: Callable[[Ctx], Setup]) -> Callable[[Ctx], Setup]:
        CASES.append(Case(name, lambda tmp: fn(Ctx(tmp)), message, code, tags))
        return fn

    return deco


def _adapter_file(c: Ctx, setup_args: list[str] | None = None, file: Path | None = None) -> Setup:
    return Setup(setup_args or c.prune(), str(file or c.st), c.out)


# -------------------------------------------------------------------------------------------------
# 1. the adapter directory and adapter_config.json
# -------------------------------------------------------------------------------------------------


@case("adapter_dir_missing", r"adapter directory does not exist")
def _(c: Ctx) -> Setup:
    write_base(c.base)
    return Setup(c.prune(), str(c.adapter), c.out)


@case("adapter_is_a_file", r"expected an adapter directory")
def _(c: Ctx) -> Setup:
    write_base(c.base)
    c.adapter.parent.mkdir(parents=True, exist_ok=True)
    c.adapter.write_text("not a directory")
    return Setup(c.prune(), str(c.adapter), c.out)


@case("config_missing", r"missing adapter_config\.json")
def _(c: Ctx) -> Setup:
    c.valid()
    c.cfg.unlink()
    return Setup(c.prune(), str(c.adapter), c.out)


@case("config_not_json", r"adapter_config\.json: not valid JSON")
def _(c: Ctx) -> Setup:
    c.valid()
    c.cfg.write_text('{"peft_type": "LORA", "r": 4,,}')
    return Setup(c.prune(), str(c.cfg), c.out)


@case("config_not_utf8", r"adapter_config\.json: not valid JSON")
def _(c: Ctx) -> Setup:
    c.valid()
    c.cfg.write_bytes(b'{"r": "\xff\xfe"}')
    return Setup(c.prune(), str(c.cfg), c.out)


@case("config_is_a_list", r"adapter_config\.json: expected a JSON object")
def _(c: Ctx) -> Setup:
    c.valid()
    c.cfg.write_text("[1, 2, 3]")
    return Setup(c.prune(), str(c.cfg), c.out)


def _bad_config(name: str, message: str, **over: Any) -> None:
    @case(name, message)
    def _(c: Ctx) -> Setup:
        c.valid()
        c.cfg.write_text(json.dumps(adapter_config(**over)))
        return Setup(c.prune(), str(c.cfg), c.out)


_bad_config("config_r_is_string", r"'r' must be a positive integer, got '4'", r="4")
_bad_config("config_r_zero", r"'r' must be a positive integer, got 0", r=0)
_bad_config("config_r_bool", r"'r' must be a positive integer, got True", r=True)
_bad_config("config_alpha_string", r"'lora_alpha' must be a number, got 'eight'", lora_alpha="eight")
_bad_config("config_alpha_nan", r"'lora_alpha' must be a number, got nan", lora_alpha=float("nan"))
_bad_config("config_peft_type_unknown", r"peft_type 'IA3' is not supported", peft_type="IA3")
_bad_config("config_peft_type_not_string", r"peft_type 7 is not supported", peft_type=7)
_bad_config("config_dora", r"DoRA adapters \(use_dora=true\) are not supported", use_dora=True)
_bad_config("config_target_parameters", r"target_parameters .* not supported", target_parameters=["experts.w1"])
_bad_config("config_rslora_not_bool", r"'use_rslora' must be true or false, got 'yes'", use_rslora="yes")
_bad_config("config_target_modules_int", r"'target_modules' must be a string or a list, got int", target_modules=5)
_bad_config("config_target_modules_mixed", r"'target_modules' must be a list of strings", target_modules=["q_proj", 1])
_bad_config("config_rank_pattern_not_object", r"'rank_pattern' must be an object, got list", rank_pattern=["q_proj"])
_bad_config(
    "config_rank_pattern_zero",
    r"'rank_pattern\['q_proj'\]' must be a positive number, got 0",
    rank_pattern={"q_proj": 0},
)
_bad_config(
    "config_rank_pattern_bad_regex",
    r"'rank_pattern' key '\(q_proj' is not a valid regular expression",
    rank_pattern={"(q_proj": 8},
)


@case(
    "config_rank_pattern_disagrees",
    r"module 'model\.layers\.0\.self_attn\.q_proj': tensors have rank 4 but "
    r"adapter_config\.json gives r=8",
)
def _(c: Ctx) -> Setup:
    # a rank_pattern that names present modules with a rank their tensors do not have is an error
    c.valid()
    c.cfg.write_text(json.dumps(adapter_config(rank_pattern={"q_proj": 8})))
    return Setup(c.prune(), str(c.st), c.out)


@case("config_symlink_outside", r"adapter_config\.json: is a symbolic link to .*outside the input directory")
def _(c: Ctx) -> Setup:
    c.valid()
    elsewhere = c.tmp / "elsewhere.json"
    elsewhere.write_text(c.cfg.read_text())
    c.cfg.unlink()
    c.cfg.symlink_to(elsewhere)
    return Setup(c.prune(), str(c.cfg), c.out)


@case("hostile_names_escaped", r"missing adapter_config\.json")
def _(c: Ctx) -> Setup:
    # a directory name with a newline, an ANSI escape, rich markup and an emoji code: printed verbatim,
    # escaped, on one line
    write_base(c.base)
    weird = c.tmp / "in" / "[bold]x:smile:\n\x1b[31mred"
    weird.mkdir(parents=True)
    return Setup(c.prune(adapter=weird), "[bold]x:smile:\\n\\x1b[31mred", c.out)


# -------------------------------------------------------------------------------------------------
# 2. adapter_model.safetensors: structure
# -------------------------------------------------------------------------------------------------


@case("weights_missing", r"missing adapter_model\.safetensors")
def _(c: Ctx) -> Setup:
    c.valid()
    c.st.unlink()
    return Setup(c.prune(), str(c.adapter), c.out)


@case("st_empty_file", r"truncated safetensors file \(shorter than its 8-byte header length\)")
def _(c: Ctx) -> Setup:
    c.valid()
    c.st.write_bytes(b"")
    return _adapter_file(c)


@case("st_truncated_in_header_length", r"truncated safetensors file \(shorter than its 8-byte header length\)")
def _(c: Ctx) -> Setup:
    c.valid()
    c.st.write_bytes(c.st.read_bytes()[:5])
    return _adapter_file(c)


@case("st_header_length_lies", r"corrupt safetensors header: header length \d+ does not fit in a \d+-byte file")
def _(c: Ctx) -> Setup:
    c.valid()
    raw = c.st.read_bytes()
    c.st.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    return _adapter_file(c)


@case("st_header_length_huge", r"corrupt safetensors header: header length 18446744073709551615 does not fit")
def _(c: Ctx) -> Setup:
    c.valid()
    raw = c.st.read_bytes()
    c.st.write_bytes(b"\xff" * 8 + raw[8:])
    return _adapter_file(c)


@case("st_header_not_json", r"corrupt safetensors header: not valid JSON")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    h = json.dumps(header).encode()
    c.st.write_bytes(struct.pack("<Q", len(h)) + b"{" * len(h) + data)
    return _adapter_file(c)


@case("st_header_not_object", r"corrupt safetensors header: not a JSON object")
def _(c: Ctx) -> Setup:
    c.valid()
    raw_safetensors(c.st, [1, 2], b"")  # type: ignore[arg-type]
    return _adapter_file(c)


@case("st_data_truncated", r"truncated safetensors file: tensor '.*' ends at byte \d+ of a \d+-byte data section")
def _(c: Ctx) -> Setup:
    c.valid()
    c.st.write_bytes(c.st.read_bytes()[:-100])
    return _adapter_file(c)


@case("st_offsets_overlap", r"corrupt safetensors header: tensors '.*' and '.*' overlap")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    # make b start in the middle of a, keeping its length (sizes still agree with shapes)
    length = b["data_offsets"][1] - b["data_offsets"][0]
    start = a["data_offsets"][0] + 4
    b["data_offsets"] = [start, start + length]
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("st_dtype_unknown", r"tensor '.*' has unknown dtype 'F7'")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F7"
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("st_size_disagrees_with_shape", r"corrupt safetensors header: tensor '.*' spans \d+ bytes but its shape")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] * 2]
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("st_negative_offset", r"corrupt safetensors header: bad shape or offsets for '.*'")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [-16, header[name]["data_offsets"][1]]
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("st_entry_without_fields", r"corrupt safetensors header: entry 'junk' lacks dtype/shape/data_offsets")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    header["junk"] = {"dtype": "F32"}
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("st_symlink_outside", r"adapter_model\.safetensors: is a symbolic link to .*outside the input directory")
def _(c: Ctx) -> Setup:
    c.valid()
    elsewhere = c.tmp / "elsewhere.safetensors"
    elsewhere.write_bytes(c.st.read_bytes())
    c.st.unlink()
    c.st.symlink_to(elsewhere)
    return _adapter_file(c)


# -------------------------------------------------------------------------------------------------
# 3. adapter tensors: semantics
# -------------------------------------------------------------------------------------------------

Q0 = f"{PREFIX}{module_name(0, 'q_proj')}"


def _tensor_case(name: str, message: str, edit: Callable[[dict], None]) -> None:
    @case(name, message)
    def _(c: Ctx) -> Setup:
        write_base(c.base)
        t = adapter_tensors()
        edit(t)
        write_adapter(c.adapter, t)
        return _adapter_file(c)


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(key, value)


def _poison(key: str, value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        x = t[key].clone()
        x[0, 1] = value
        t[key] = x

    return edit


_tensor_case(
    "ab_rank_mismatch",
    r"module 'model\.layers\.0\.self_attn\.q_proj': lora_A \(4, 64\) and lora_B "
    r"\(64, 3\) disagree on the rank",
    _set(f"{Q0}.lora_B.weight", torch.zeros(64, 3)),
)
_tensor_case(
    "a_without_b",
    r"module 'model\.layers\.0\.self_attn\.q_proj' has lora_A but no lora_B tensor",
    lambda t: t.pop(f"{Q0}.lora_B.weight"),
)
_tensor_case(
    "b_without_a",
    r"module 'model\.layers\.0\.self_attn\.q_proj' has lora_B but no lora_A tensor",
    lambda t: t.pop(f"{Q0}.lora_A.weight"),
)
_tensor_case(
    "nan_in_A", r"tensor '.*q_proj\.lora_A\.weight' contains NaN", _poison(f"{Q0}.lora_A.weight", float("nan"))
)
_tensor_case(
    "inf_in_B", r"tensor '.*q_proj\.lora_B\.weight' contains Inf", _poison(f"{Q0}.lora_B.weight", float("inf"))
)
_tensor_case(
    "nan_in_passthrough_tensor",
    r"tensor 'base_model\.model\.lm_head\.modules_to_save\.default\.weight' "
    r"contains NaN",
    _set(f"{PREFIX}lm_head.modules_to_save.default.weight", torch.full((4, 4), float("nan"))),
)
_tensor_case(
    "integer_lora_tensors",
    r"LoRA tensors must be floating point, got torch\.int32",
    _set(f"{Q0}.lora_A.weight", torch.zeros(4, 64, dtype=torch.int32)),
)
_tensor_case(
    "conv_lora_3d",
    r"are not 2-D \(LoRA on Conv layers is not supported\)",
    _set(f"{Q0}.lora_A.weight", torch.zeros(4, 64, 1)),
)
_tensor_case(
    "rank_zero_tensors",
    r"module 'model\.layers\.0\.self_attn\.q_proj' has rank 0",
    lambda t: (
        t.__setitem__(f"{Q0}.lora_A.weight", torch.zeros(0, 64)),
        t.__setitem__(f"{Q0}.lora_B.weight", torch.zeros(64, 0)),
    ),
)
_tensor_case(
    "dora_magnitude_tensor",
    r"DoRA tensor '.*lora_magnitude_vector.*' found",
    _set(f"{Q0}.lora_magnitude_vector", torch.ones(64)),
)
_tensor_case(
    "lora_A_bias",
    r"unexpected tensor '.*lora_A\.bias' \(lora_A has no bias in PEFT\)",
    _set(f"{Q0}.lora_A.bias", torch.zeros(4)),
)
_tensor_case(
    "lora_B_bias_wrong_shape",
    r"lora_B\.bias \(7,\) does not match out_features 64",
    _set(f"{Q0}.lora_B.bias", torch.zeros(7)),
)
_tensor_case(
    "duplicate_lora_A", r"has two lora_A\.weight tensors", _set(f"{Q0}.lora_A.default.weight", torch.zeros(4, 64))
)
_tensor_case(
    "no_lora_tensors",
    r"no LoRA tensors \(lora_A/lora_B\) found",
    lambda t: [t.pop(k) for k in list(t)] and t.__setitem__("something_else", torch.zeros(2)),
)
_tensor_case(
    "hostile_tensor_name", r"contains NaN", _set(f"{PREFIX}evil\n\x1b[2J[bold]name", torch.full((2,), float("nan")))
)


# -------------------------------------------------------------------------------------------------
# 4. pickles: never executed
# -------------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs ``open(marker, 'w')``: the proof that a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_adapter(c: Ctx, payload: Any, use_torch_save: bool = False, protocol: int | None = None) -> Path:
    write_base(c.base)
    write_adapter(c.adapter)
    c.st.unlink()
    binf = c.adapter / "adapter_model.bin"
    if use_torch_save:
        torch.save(payload, binf)
    else:
        with open(binf, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
    return binf


@case("pickle_refused_by_default", r"pickled adapter weights are refused .* --allow-pickle", tags=("marker",))
def _(c: Ctx) -> Setup:
    binf = _pickled_adapter(c, {"w": _Evil(c.tmp / MARKER_NAME)})
    return Setup(c.prune(), str(binf), c.out)


@case(
    "pickle_malicious_with_allow_pickle",
    r"pickle refused: pickle opcode \d+ is outside what a torch weights "
    r"file may contain; nothing in it was executed",
    tags=("marker",),
)
def _(c: Ctx) -> Setup:
    binf = _pickled_adapter(c, {"w": _Evil(c.tmp / MARKER_NAME)})
    return Setup(c.prune("--allow-pickle"), str(binf), c.out)


@case(
    "pickle_malicious_torch_save",
    r"pickle refused: it references _?io\.open, which is not a tensor type; "
    r"nothing in it was executed",
    tags=("marker",),
)
def _(c: Ctx) -> Setup:
    binf = _pickled_adapter(c, {"w": _Evil(c.tmp / MARKER_NAME)}, use_torch_save=True)
    return Setup(c.prune("--allow-pickle"), str(binf), c.out)


@case(
    "pickle_malicious_protocol2",
    r"pickle refused: it references _?io\.open, which is not a tensor type; "
    r"nothing in it was executed",
    tags=("marker",),
)
def _(c: Ctx) -> Setup:
    binf = _pickled_adapter(c, {"w": _Evil(c.tmp / MARKER_NAME)}, protocol=2)
    return Setup(c.prune("--allow-pickle"), str(binf), c.out)


@case("pickle_not_a_tensor_dict", r"pickle does not contain a flat dict of tensors")
def _(c: Ctx) -> Setup:
    binf = _pickled_adapter(c, [torch.zeros(2)], use_torch_save=True)
    return Setup(c.prune("--allow-pickle"), str(binf), c.out)


@case("pickle_garbage", r"not a readable torch pickle|pickle refused")
def _(c: Ctx) -> Setup:
    binf = _pickled_adapter(c, {})
    binf.write_bytes(b"\x80\x04garbage" * 10)
    return Setup(c.prune("--allow-pickle"), str(binf), c.out)


# -------------------------------------------------------------------------------------------------
# 5. the base model
# -------------------------------------------------------------------------------------------------


@case("base_missing", r"does not exist \(expected a local directory")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    missing = c.tmp / "in" / "no-such-base"
    return Setup(c.prune(base=missing), str(missing), c.out)


@case("base_lacks_targeted_module", r"base model has no weight for LoRA module 'model\.layers\.1\.self_attn\.v_proj'")
def _(c: Ctx) -> Setup:
    t = base_tensors()
    del t[f"{module_name(1, 'v_proj')}.weight"]
    write_base(c.base, t)
    write_adapter(c.adapter)
    return Setup(c.prune(), str(c.base), c.out)


@case(
    "base_shape_differs",
    r"base tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\) but "
    r"the adapter's module .* needs \(32, 64\)",
)
def _(c: Ctx) -> Setup:
    write_base(c.base, base_tensors(shapes={**PROJ, "k_proj": (16, 64)}))
    write_adapter(c.adapter)
    return Setup(c.prune(), str(c.base_st), c.out)


def _base_poison(name: str, value: float, word: str) -> None:
    @case(name, rf"tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' contains {word}")
    def _(c: Ctx) -> Setup:
        t = base_tensors()
        w = t[f"{module_name(1, 'o_proj')}.weight"]
        w[3, 5] = value
        write_base(c.base, t)
        write_adapter(c.adapter)
        return Setup(c.prune(), str(c.base_st), c.out)


_base_poison("nan_in_W0", float("nan"), "NaN")
_base_poison("inf_in_W0", float("-inf"), "Inf")


@case("base_truncated", r"truncated safetensors file: tensor")
def _(c: Ctx) -> Setup:
    c.valid()
    c.base_st.write_bytes(c.base_st.read_bytes()[:-64])
    return Setup(c.prune(), str(c.base_st), c.out)


@case("base_pickled_only", r"base weights are pickled \(pytorch_model\.bin\)")
def _(c: Ctx) -> Setup:
    c.valid()
    c.base_st.unlink()
    with open(c.base / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil(c.tmp / MARKER_NAME)}, f)
    return Setup(c.prune(), str(c.base), c.out)


@case("base_pickle_file", r"pickled weights are refused")
def _(c: Ctx) -> Setup:
    c.valid()
    binf = c.tmp / "in" / "model.bin"
    with open(binf, "wb") as f:
        pickle.dump({"w": _Evil(c.tmp / MARKER_NAME)}, f)
    return Setup(c.prune(base=binf), str(binf), c.out)


@case(
    "base_index_missing_shard",
    r"shard 'model-00002-of-00002\.safetensors' named in model\.safetensors\.index\.json is missing",
)
def _(c: Ctx) -> Setup:
    c.valid()
    keys = list(base_tensors())
    wm = {
        k: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
        for i, k in enumerate(keys)
    }
    c.base_st.rename(c.base / "model-00001-of-00002.safetensors")
    (c.base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return Setup(c.prune(), str(c.base), c.out)


@case("base_index_corrupt", r"model\.safetensors\.index\.json: corrupt index")
def _(c: Ctx) -> Setup:
    c.valid()
    (c.base / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    return Setup(c.prune(), str(c.base / "model.safetensors.index.json"), c.out)


@case("base_shard_symlink_outside", r"model\.safetensors: is a symbolic link to .*outside the input directory")
def _(c: Ctx) -> Setup:
    c.valid()
    elsewhere = c.tmp / "stolen.safetensors"
    c.base_st.rename(elsewhere)
    c.base_st.symlink_to(elsewhere)
    return Setup(c.prune(), str(c.base_st), c.out)


@case("base_unrecognised_file", r"unrecognised weight file")
def _(c: Ctx) -> Setup:
    c.valid()
    f = c.tmp / "in" / "weights.txt"
    f.write_text("hello")
    return Setup(c.prune(base=f), str(f), c.out)


@case("base_no_weights", r"no model weights found")
def _(c: Ctx) -> Setup:
    c.valid()
    c.base_st.unlink()
    return Setup(c.prune(), str(c.base), c.out)


# -------------------------------------------------------------------------------------------------
# 6. GGUF bases
# -------------------------------------------------------------------------------------------------


def write_gguf(path: Path, tensors: dict[str, Any], arch: str = "llama") -> Path:
    """A GGUF with llama.cpp names; values are float32 arrays or (uint8 bytes, quant type) pairs."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    for name, v in tensors.items():
        if isinstance(v, tuple):
            w.add_tensor(name, v[0], raw_dtype=v[1])
        else:
            w.add_tensor(name, np.asarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def gguf_base_tensors(poison: float | None = None) -> dict[str, Any]:
    t = {}
    for k, v in base_tensors().items():
        if ".self_attn." in k:
            i, p = int(k.split(".")[2]), k.split(".")[4]
            arr = v.numpy().copy()
            if poison is not None and p == "v_proj" and i == 0:
                arr[1, 1] = poison
            t[f"blk.{i}.{_GGUF_NAMES[p]}.weight"] = arr
    return t


@case("gguf_garbage", r"not a readable GGUF file \(GGUF magic invalid\)")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    g = c.tmp / "in" / "model.gguf"
    g.write_bytes(bytes(range(256)) * 8)
    return Setup(c.prune(base=g), str(g), c.out)


@case("gguf_bad_version", r"not a readable GGUF file")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    g = c.tmp / "in" / "model.gguf"
    g.write_bytes(b"GGUF" + b"\xee" * 2000)
    return Setup(c.prune(base=g), str(g), c.out)


@case("gguf_truncated", r"not a readable GGUF file")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    g = write_gguf(c.tmp / "in" / "model.gguf", gguf_base_tensors())
    g.write_bytes(g.read_bytes()[:-3000])
    return Setup(c.prune(base=g), str(g), c.out)


@case(
    "gguf_unsupported_quant",
    r"tensor 'blk\.0\.attn_q\.weight' uses quantisation Q8_K, which the gguf package "
    r"cannot dequantise",
)
def _(c: Ctx) -> Setup:
    import gguf
    import numpy as np

    # Q8_K blocks hold 256 values in 292 bytes: a (64, 256) q_proj
    shapes = {"q_proj": (64, 256)}
    write_adapter(c.adapter, adapter_tensors(shapes=shapes, layers=1), adapter_config(target_modules=["q_proj"]))
    g = write_gguf(
        c.tmp / "in" / "model.gguf",
        {"blk.0.attn_q.weight": (np.zeros((64, 292), dtype=np.uint8), gguf.GGMLQuantizationType.Q8_K)},
    )
    return Setup(c.prune(base=g), str(g), c.out)


@case("gguf_nan_in_W0", r"tensor 'model\.layers\.0\.self_attn\.v_proj\.weight' contains NaN")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    g = write_gguf(c.tmp / "in" / "model.gguf", gguf_base_tensors(poison=float("nan")))
    return Setup(c.prune(base=g), str(g), c.out)


@case("gguf_two_files_in_dir", r"several GGUF files; name one of them")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    d = c.tmp / "in" / "gg"
    write_gguf(d / "a.gguf", gguf_base_tensors())
    write_gguf(d / "b.gguf", gguf_base_tensors())
    return Setup(c.prune(base=d), str(d), c.out)


@case("gguf_symlink_outside", r"model\.gguf: is a symbolic link to .*outside the input directory")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    real = write_gguf(c.tmp / "elsewhere" / "real.gguf", gguf_base_tensors())
    d = c.tmp / "in" / "gg"
    d.mkdir(parents=True)
    (d / "model.gguf").symlink_to(real)
    return Setup(c.prune(base=d), str(d / "model.gguf"), c.out)


# -------------------------------------------------------------------------------------------------
# 7. aligned / unaligned pairs (for pair methods; a test scorer that needs both is registered)
# -------------------------------------------------------------------------------------------------


def register_pair_scorer(monkeypatch: Any) -> None:
    from safeprune.scoring.base import REGISTRY, Scorer

    class PairProbe(Scorer):
        """Test-only: ‖W_aligned − W_unaligned‖ per module."""

        name = "pairprobe"
        requires = ("aligned", "unaligned")
        primary = "gap"
        descending = True
        hidden = True

        def columns(self):
            return ["gap"]

        def score(self, ctx):
            return {"gap": float((ctx.weight("aligned") - ctx.weight("unaligned")).norm())}

    monkeypatch.setitem(REGISTRY, "pairprobe", PairProbe)


@case("pair_different_architectures", r"aligned and unaligned models differ in architecture: model_type is 'llama'")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    al, un = c.tmp / "in" / "aligned", c.tmp / "in" / "unaligned"
    write_base(al)
    write_base(un, base_tensors(seed=5), {**BASE_CONFIG, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    args = [
        "prune",
        str(c.adapter),
        "--method",
        "pairprobe",
        "--aligned",
        str(al),
        "--unaligned",
        str(un),
        "-o",
        str(c.out),
        "--top",
        "1",
    ]
    return Setup(args, str(un), c.out, patch=register_pair_scorer)


@case(
    "pair_unaligned_shape_differs",
    r"unaligned tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\)",
)
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    al, un = c.tmp / "in" / "aligned", c.tmp / "in" / "unaligned"
    write_base(al)
    write_base(un, base_tensors(shapes={**PROJ, "k_proj": (16, 64)}))
    (un / "config.json").unlink()  # nothing to compare but the tensors themselves
    args = [
        "prune",
        str(c.adapter),
        "--method",
        "pairprobe",
        "--aligned",
        str(al),
        "--unaligned",
        str(un),
        "-o",
        str(c.out),
        "--top",
        "1",
    ]
    return Setup(args, str(un / "model.safetensors"), c.out, patch=register_pair_scorer)


# -------------------------------------------------------------------------------------------------
# 8. outputs
# -------------------------------------------------------------------------------------------------


@case("output_inside_input", r"output .* is inside the input .*; choose another output directory")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out = c.adapter / "pruned"
    return Setup(c.prune(), str(c.adapter), c.out)


@case("output_is_input", r"output .* is inside the input")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out = c.adapter
    return Setup(c.prune("--force"), str(c.adapter), c.out, output_preexists=True)


@case("output_contains_input", r"output .* contains the input")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out = c.tmp / "in"
    return Setup(c.prune("--force"), str(c.adapter), c.out, output_preexists=True)


@case("output_inside_base", r"output .* is inside the input .*base")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out = c.base / "pruned"
    return Setup(c.prune(), str(c.base), c.out)


@case("output_symlink_into_input", r"output .* is inside the input")
def _(c: Ctx) -> Setup:
    c.valid()
    link = c.tmp / "out" / "link"
    link.symlink_to(c.adapter / "sub")  # dangling, but it resolves into the input
    c.out = link
    return Setup(c.prune(), str(c.adapter), None)


@case("output_exists", r"output .* already exists; pass --force to replace it")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out.mkdir(parents=True)
    (c.out / "keep.txt").write_text("mine")
    return Setup(c.prune(), str(c.out), c.out, output_preexists=True)


@case("output_is_a_file_with_force", r"exists and is not a directory; refusing to replace it")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out.write_text("a file")
    return Setup(c.prune("--force"), str(c.out), c.out, output_preexists=True)


@case("output_parent_is_a_file", r"cannot create the output directory \(.*\); nothing was written")
def _(c: Ctx) -> Setup:
    c.valid()
    blocker = c.tmp / "out" / "blocker"
    blocker.write_text("x")
    c.out = blocker / "pruned"
    return Setup(c.prune(), str(c.out), c.out)


@case("json_inside_input", r"output .*scores\.json would write into or over the input")
def _(c: Ctx) -> Setup:
    c.valid()
    j = c.adapter / "scores.json"
    return Setup(["scan", str(c.adapter), "--base", str(c.base), "--json", str(j)], str(j), j)


@case("json_is_a_directory", r"output .* is a directory; give a file name")
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune("--json", str(c.tmp / "out")), str(c.tmp / "out"), c.out)


def _enospc_save_file(monkeypatch: Any) -> None:
    """A disk that fills up half-way through the weights: some bytes land, then ENOSPC."""
    import safetensors.torch as st

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(st, "save_file", full)


def _enospc_fsync(monkeypatch: Any) -> None:
    """Delayed allocation: the writes succeed, fsync reports the full disk."""
    real = os.fsync

    def fsync(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}") or not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _interrupt_mid_write(monkeypatch: Any) -> None:
    """Ctrl-C after the weights are on disk but before the config: a half-written adapter in the temp dir."""
    import safetensors.torch as st

    real = st.save_file

    def save_then_interrupt(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", save_then_interrupt)


@case("disk_full_during_weights", r"cannot write the adapter \(No space left on device\); nothing was written")
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune(), str(c.out), c.out, patch=_enospc_save_file)


@case("disk_full_at_fsync", r"cannot write the adapter \(No space left on device\); nothing was written")
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune(), str(c.out), c.out, patch=_enospc_fsync)


@case("disk_full_replacing_with_force", r"cannot write the adapter \(No space left on device\)")
def _(c: Ctx) -> Setup:
    # the old output must survive untouched
    c.valid()
    c.out.mkdir(parents=True)
    (c.out / "old.txt").write_text("previous result")
    return Setup(c.prune("--force"), str(c.out), c.out, output_preexists=True, patch=_enospc_save_file)


@case("disk_full_json", r"scores\.json: cannot write \(No space left on device\); nothing was written")
def _(c: Ctx) -> Setup:
    c.valid()
    j = c.tmp / "out" / "scores.json"
    return Setup(["scan", str(c.adapter), "--base", str(c.base), "--json", str(j)], str(j), j, patch=_enospc_fsync)


@case("interrupt_mid_write", r"^interrupted: no output was written$", code=130)
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune(), None, c.out, patch=_interrupt_mid_write)


def _import_fails(sigint: bool) -> Callable[[Any], None]:
    """Writing the weights raises ``ImportError: initialization failed``: what a Ctrl-C that lands inside a
    C extension's module initialisation (torch and its dependencies load lazily, for seconds) becomes instead
    of KeyboardInterrupt — the SIGINT stress test once got "internal error", exit 1. With ``sigint`` the SIGINT
    handler has recorded the signal (an interrupt); without, it is a broken install (an internal error)."""

    def patch(monkeypatch: Any) -> None:
        import safetensors.torch as st

        import safeprune.io.commit as commit

        def save(tensors, filename, metadata=None):
            monkeypatch.setattr(commit, "_SIGINT", [True] if sigint else [])
            raise ImportError("initialization failed")

        monkeypatch.setattr(st, "save_file", save)

    return patch


@case("interrupt_inside_a_c_extension_import", r"^interrupted: no output was written$", code=130)
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune(), None, c.out, patch=_import_fails(sigint=True))


@case("import_error_is_not_an_interrupt", r"^internal error: ImportError: initialization failed", code=1)
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune(), None, c.out, patch=_import_fails(sigint=False))


# -------------------------------------------------------------------------------------------------
# 9. more header lies
# -------------------------------------------------------------------------------------------------


@case(
    "st_absurd_shape",
    r"corrupt safetensors header: tensor '.*' spans \d+ bytes but its shape \[1099511627776, "
    r"1099511627776\] and dtype F32 need",
)
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**40, 2**40]
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("st_metadata_not_strings", r"corrupt safetensors header: __metadata__ value of 'format' is not a string")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    header["__metadata__"] = {"format": 1}
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


def _interrupt_during_swap(monkeypatch: Any) -> None:
    """Ctrl-C at the worst moment of --force: the old output moved aside, the new one not yet in place (the
    rename that would put it there raises, as a signal delivered there would)."""
    import safeprune.io.commit as commit

    real = commit.rename_noreplace

    def rename(src, dst):
        if ".safeprune-tmp-" in str(src):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(commit, "rename_noreplace", rename)


@case("interrupt_while_replacing_with_force", r"^interrupted: no output was written$", code=130)
def _(c: Ctx) -> Setup:
    # the previous output must be back in place, untouched
    c.valid()
    c.out.mkdir(parents=True)
    (c.out / "old.txt").write_text("previous result")
    return Setup(c.prune("--force"), None, c.out, output_preexists=True, patch=_interrupt_during_swap)


@case("st_duplicate_tensor_name", r"corrupt safetensors header: '.*q_proj\.lora_A\.weight' appears twice")
def _(c: Ctx) -> Setup:
    # two entries for one name: Python's json and safetensors' serde could each pick a different one
    c.valid()
    header, data = split_safetensors(c.st)
    name = f"{Q0}.lora_A.weight"
    other = next(
        k for k, v in header.items() if k not in ("__metadata__", name) and v["shape"] == header[name]["shape"]
    )
    text = json.dumps(header)[:-1] + ", " + json.dumps({name: header[other]})[1:]
    h = text.encode()
    c.st.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return _adapter_file(c)


@case("st_is_a_fifo", r"adapter_model\.safetensors: not a regular file \(a FIFO, device or directory\)")
def _(c: Ctx) -> Setup:
    # reading a FIFO would block forever
    c.valid()
    c.st.unlink()
    os.mkfifo(c.st)
    return _adapter_file(c)


@case("gguf_is_a_fifo", r"model\.gguf: not a regular file")
def _(c: Ctx) -> Setup:
    write_adapter(c.adapter)
    g = c.tmp / "in" / "model.gguf"
    os.mkfifo(g)
    return Setup(c.prune(base=g), str(g), c.out)


@case("base_index_path_traversal", r"resolves to .*outside\.safetensors, outside the input directory")
def _(c: Ctx) -> Setup:
    # an index that points a shard at a file beside (not inside) the model directory
    c.valid()
    outside = c.tmp / "in" / "outside.safetensors"
    c.base_st.rename(outside)
    wm = {k: "../outside.safetensors" for k in base_tensors()}
    (c.base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return Setup(c.prune(), str(c.base / "../outside.safetensors"), c.out)


# -------------------------------------------------------------------------------------------------
# 9. hostile inputs, round two (issue 15): one case or more per class, each refused at its root
# -------------------------------------------------------------------------------------------------

DEEP = 5000  # far past any real nesting, far past Python's recursion limit


def _deep(n: int = DEEP) -> str:
    return "[" * n + "]" * n


@case("deep_json_adapter_config", r"adapter_config\.json: adapter_config\.json nested more than 64 levels deep")
def _(c: Ctx) -> Setup:
    c.valid()
    c.cfg.write_text('{"peft_type": "LORA", "x": ' + _deep() + "}")
    return Setup(c.prune(), str(c.cfg), c.out)


@case("deep_json_safetensors_header", r"the safetensors header nested more than 64 levels deep")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    h = json.dumps(header)[:-1] + ', "__junk__": ' + _deep() + "}"
    raw = h.encode()
    c.st.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return _adapter_file(c)


@case("deep_json_base_index", r"the shard index nested more than 64 levels deep")
def _(c: Ctx) -> Setup:
    c.valid()
    (c.base / "model.safetensors.index.json").write_text('{"weight_map": ' + _deep() + "}")
    return Setup(c.prune(), str(c.base / "model.safetensors.index.json"), c.out)


@case("deep_json_score_table", r"the score table nested more than 64 levels deep")
def _(c: Ctx) -> Setup:
    c.valid()
    t = c.tmp / "in" / "scores.json"
    t.write_text('{"rows": ' + _deep() + "}")
    return Setup(c.prune("--scores", str(t)), str(t), c.out)


def _pair_with_config(c: Ctx, config_text: str) -> Setup:
    """A SafeLoRA prune whose unaligned model has the given config.json."""
    c.valid()
    u = c.tmp / "in" / "unaligned"
    write_base(u, base_tensors(seed=5))
    (u / "config.json").write_text(config_text)
    args = [
        "prune",
        str(c.adapter),
        "--aligned",
        str(c.base),
        "--unaligned",
        str(u),
        "-m",
        "safelora",
        "-o",
        str(c.out),
        "--top",
        "2",
    ]
    return Setup(args, str(u / "config.json"), c.out)


@case("deep_json_pair_config", r"config\.json: config\.json nested more than 64 levels deep")
def _(c: Ctx) -> Setup:
    return _pair_with_config(c, '{"model_type": ' + _deep() + "}")


@case("corrupt_pair_config", r"config\.json: not valid JSON")
def _(c: Ctx) -> Setup:
    return _pair_with_config(c, "{not json")


@case("catastrophic_rank_pattern", r"'rank_pattern' key '\(x\|x\)\+y' takes too long to match")
def _(c: Ctx) -> Setup:
    c.valid()
    # a module named 32 x's: the pattern's nested quantifiers backtrack exponentially on it
    t = adapter_tensors()
    name = "model.layers.0." + "x" * 32
    g = torch.Generator().manual_seed(3)
    t[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(R, 64, generator=g)
    t[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(64, R, generator=g)
    patterns = {"(x|x)+y": 4}  # exponential backtracking, even in the regex package
    write_adapter(c.adapter, t, adapter_config(rank_pattern=patterns))
    return Setup(["inspect", str(c.adapter)], str(c.cfg), None)


@case("index_weight_map_value_not_a_string", r"weight_map\[.*\] is 7, not a shard file name")
def _(c: Ctx) -> Setup:
    c.valid()
    wm = {k: "model.safetensors" for k in base_tensors()}
    wm["model.norm.weight"] = 7
    (c.base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return Setup(c.prune(), str(c.base / "model.safetensors.index.json"), c.out)


@case("output_name_too_long", r"File name too long")
def _(c: Ctx) -> Setup:
    c.valid()
    c.out = c.tmp / "out" / ("n" * 300)  # over NAME_MAX: even asking whether it exists fails
    return Setup(c.prune(), None, None)


def _score_table(c: Ctx, mutate: Callable[[dict], Any]) -> Path:
    from safeprune.scoring import scan

    data = json.loads(scan(str(c.adapter), str(c.base), "ddi").to_json())
    data = mutate(data) or data
    t = c.tmp / "in" / "scores.json"
    t.write_text(json.dumps(data))
    return t


@case("score_table_is_a_list", r"not a score table \(no 'rows'\)")
def _(c: Ctx) -> Setup:
    c.valid()
    t = _score_table(c, lambda d: [d])
    return Setup(c.prune("--scores", str(t)), str(t), c.out)


@case("score_table_string_score", r"score 'ddi' of module .* is 'high', not a number")
def _(c: Ctx) -> Setup:
    c.valid()
    t = _score_table(c, lambda d: d["rows"][0].update(ddi="high"))
    return Setup(c.prune("--scores", str(t)), str(t), c.out)


@case("score_table_nan_scores", r"score 'ddi' of module .* is None, not a finite number")
def _(c: Ctx) -> Setup:
    c.valid()

    def nan_all(d):
        for r in d["rows"]:
            r["ddi"] = None

    t = _score_table(c, nan_all)
    return Setup(c.prune("--scores", str(t)), str(t), c.out)


@case("score_table_forged_duplicate_row", r"module .* has two rows")
def _(c: Ctx) -> Setup:
    c.valid()
    t = _score_table(c, lambda d: d["rows"].append({**d["rows"][-1], "ddi": 99.0}))
    return Setup(c.prune("--scores", str(t)), str(t), c.out)


@case("score_table_for_another_adapter", r"the score table was computed for another adapter")
def _(c: Ctx) -> Setup:
    c.valid()
    t = _score_table(c, lambda d: d["meta"].update(adapter_sha256="0" * 64))
    return Setup(c.prune("--scores", str(t)), str(t), c.out)


@case("threshold_nan", r"--threshold must be a finite number, got nan")
def _(c: Ctx) -> Setup:
    c.valid()
    args = [a for a in c.prune() if a not in ("--top", "2")] + ["--threshold", "nan"]
    return Setup(args, None, c.out)


@case("threshold_norm_inf", r"--threshold-norm must be a finite number, got inf")
def _(c: Ctx) -> Setup:
    c.valid()
    args = [a for a in c.prune() if a not in ("--top", "2")] + ["--threshold-norm", "inf"]
    return Setup(args, None, c.out)


@case("duplicate_tensor_across_shards", r"is in two shards \(a\.safetensors and b\.safetensors\)")
def _(c: Ctx) -> Setup:
    c.valid()
    t = base_tensors()
    c.base_st.unlink()
    save_file(t, str(c.base / "a.safetensors"))
    k = f"{module_name(0, 'q_proj')}.weight"
    save_file({k: t[k] * 2}, str(c.base / "b.safetensors"))
    return Setup(c.prune(), str(c.base), c.out)


@case("int8_base_weight", r"is stored as int8: a quantised weight without its scales cannot be scored")
def _(c: Ctx) -> Setup:
    t = base_tensors()
    k = f"{module_name(0, 'q_proj')}.weight"
    t[k] = (t[k] * 100).to(torch.int8)
    write_base(c.base, t)
    write_adapter(c.adapter)
    return Setup(c.prune(), str(c.base_st), c.out)


@case("json_onto_a_symlink", r"output .* is a symbolic link; refusing to replace it")
def _(c: Ctx) -> Setup:
    c.valid()
    target = c.tmp / "in" / "precious.txt"
    target.write_text("keep me")
    link = c.tmp / "out" / "scores.json"
    link.symlink_to(target)
    return Setup(c.prune("--json", str(link)), str(link), c.out)


@case("json_onto_a_device", r"output /dev/null is a device or FIFO, not a file")
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune("--json", "/dev/null"), "/dev/null", c.out)


@case("plot_onto_the_config_beside_a_base_file", r"would replace a file read with the input")
def _(c: Ctx) -> Setup:
    c.valid()
    return Setup(c.prune("--plot", str(c.base / "config.json"), base=c.base_st), str(c.base / "config.json"), c.out)


@case("full_disk_on_a_side_file_leaves_no_adapter", r"scores\.json: cannot write \(No space left on device\)")
def _(c: Ctx) -> Setup:
    c.valid()
    j = c.tmp / "out" / "scores.json"

    def enospc_on_json(monkeypatch: Any) -> None:
        real = Path.write_text

        def write_text(self, *a, **k):
            if self.name.startswith(".scores.json."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)

    return Setup(c.prune("--json", str(j)), "scores.json", c.out, patch=enospc_on_json)


@case("header_over_the_size_limit", r"safetensors header of \d+ bytes exceeds the 16 MiB limit")
def _(c: Ctx) -> Setup:
    c.valid()
    header, data = split_safetensors(c.st)
    header["__metadata__"] = {"format": "pt", "pad": "x" * (17 * 1024 * 1024)}
    raw_safetensors(c.st, header, data)
    return _adapter_file(c)


@case("adapter_keys_with_an_extra_model_level", r"base model has no weight for LoRA module 'model\.model\.layers")
def _(c: Ctx) -> Setup:
    write_base(c.base)
    t = {k.replace(PREFIX, PREFIX + "model."): v for k, v in adapter_tensors().items()}
    write_adapter(c.adapter, t)
    return Setup(c.prune(), str(c.base), c.out)
