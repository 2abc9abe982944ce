"""Property-based fuzzing of the three untrusted documents safeprune parses: a safetensors header,
``adapter_config.json`` and a score table (``prune --scores``).

Whatever hypothesis writes there, the command must end with exit 0 or 2 (never 1, the "internal error"
of an unexpected exception), print no traceback, leave no temporary or partial output behind, and finish
within a time bound.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

from corpus import Ctx, split_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_corpus import leftovers, run_cli

TIME_BOUND_S = 30.0
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)


def _check(args: list[str], out_dir: Path) -> None:
    t0 = time.monotonic()
    code, stdout, stderr, exc = run_cli(args)
    assert time.monotonic() - t0 < TIME_BOUND_S
    assert code in (0, 2), f"exit {code}: {stderr!r} {exc!r}"
    assert "Traceback" not in stdout + stderr
    assert leftovers(out_dir) == []
    if code == 2:  # refused: nothing written
        assert not (out_dir / "pruned").exists()


def _case() -> tuple[tempfile.TemporaryDirectory, Ctx]:
    td = tempfile.TemporaryDirectory()
    return td, Ctx(Path(td.name)).valid()


@SETTINGS
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "r",
                "lora_alpha",
                "rank_pattern",
                "alpha_pattern",
                "use_rslora",
                "fan_in_fan_out",
                "target_modules",
                "peft_type",
                "use_dora",
                "target_parameters",
                "bias",
                "x",
            ]
        ),
        json_values,
        max_size=4,
    )
)
def test_fuzz_adapter_config(changes):
    td, c = _case()
    with td:
        cfg = json.loads(c.cfg.read_text())
        cfg.update(changes)
        c.cfg.write_text(json.dumps(cfg))
        _check(c.prune(), c.tmp / "out")


@SETTINGS
@given(
    entry=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "new"]),
    value=json_values,
    raw_tail=st.binary(max_size=16),
)
def test_fuzz_safetensors_header(entry, value, raw_tail):
    td, c = _case()
    with td:
        header, data = split_safetensors(c.st)
        name = next(k for k in header if k != "__metadata__")
        if entry == "__metadata__":
            header["__metadata__"] = value
        elif entry == "new":
            header["model.layers.9.self_attn.q_proj.lora_A.weight"] = value
        else:
            header[name] = {**header[name], entry: value}
        raw = json.dumps(header).encode() + raw_tail
        c.st.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        _check(c.prune(), c.tmp / "out")


@SETTINGS
@given(where=st.sampled_from(["row", "rows", "methods", "meta", "top"]), key=st.text(max_size=10), value=json_values)
def test_fuzz_score_table(where, key, value):
    td, c = _case()
    with td:
        code, stdout, stderr, _ = run_cli(["-q", "scan", str(c.adapter), "--base", str(c.base), "--json", "-"])
        assert code == 0, stderr
        table = json.loads(stdout)
        if where == "row":
            table["rows"][0][key or "ddi"] = value
        elif where == "rows":
            table["rows"] = value
        elif where == "methods":
            table["methods"]["ddi"][key or "primary"] = value
        elif where == "meta":
            table["meta"] = value
        else:
            table[key or "rows"] = value
        t = c.tmp / "in" / "scores.json"
        t.write_text(json.dumps(table))
        _check(c.prune("--scores", str(t)), c.tmp / "out")
