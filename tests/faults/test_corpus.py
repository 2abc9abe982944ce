"""Every case of the fault corpus through the real CLI (see corpus.py).

For each case: the exit code; exactly one line on stderr, no traceback; the line names the file and the
problem; the output does not exist afterwards (or, when it existed before, is unchanged); no temporary
directory or file is left next to it; the inputs are byte-for-byte unchanged; no pickle was executed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import CASES, MARKER_NAME, Ctx, Setup
from typer.testing import CliRunner

from safeprune.cli import app

SRC = Path(__file__).resolve().parents[2] / "src"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (files, directories, symlinks) with its content hash / link target."""
    out: dict[str, str] = {}
    if not root.exists() and not root.is_symlink():
        return out
    if root.is_file() and not root.is_symlink():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif not p.is_file():  # a FIFO (reading it would block)
                out[rel] = f"special:{stat.S_IFMT(p.stat().st_mode)}"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(d: Path) -> list[str]:
    """Temporary files or directories an interrupted writer could leave behind."""
    if not d.is_dir():
        return []
    return [
        p.name
        for p in d.iterdir()
        if ".safeprune-tmp-" in p.name
        or ".safeprune-old-" in p.name
        or (p.name.startswith(".") and (p.name.endswith(".tmp") or ".tmp" in p.name))
    ]


def run_cli(args: list[str]):
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.stdout, res.stderr, res.exception


def test_corpus_is_big_enough():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case, tmp_path, monkeypatch):
    setup: Setup = case.build(tmp_path)
    inputs = tmp_path / "in"
    before_in = snapshot(inputs)
    out = setup.output
    before_out = snapshot(out) if out is not None else None
    if setup.patch:
        setup.patch(monkeypatch)

    code, stdout, stderr, exc = run_cli(setup.args)
    monkeypatch.undo()

    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr + stdout
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    line = lines[0]
    assert code == case.code, f"exit {code} (expected {case.code}): {line}"
    assert re.search(case.message, line), f"{line!r} does not match {case.message!r}"
    if case.code == 2:
        assert line.startswith("error: "), line
    if setup.file is not None:
        assert setup.file in line, f"{line!r} does not name {setup.file!r}"
    # nothing written, nothing left half-written
    if out is not None:
        if setup.output_preexists:
            assert snapshot(out) == before_out, "a pre-existing output was modified"
        else:
            assert not out.exists() and not out.is_symlink(), f"{out} exists after a failed run"
        assert leftovers(out.parent) == []
    assert leftovers(tmp_path / "out") == []
    # the input is unchanged and no pickle ran
    assert snapshot(inputs) == before_in, "an input was modified"
    assert not (tmp_path / MARKER_NAME).exists(), "a pickle was executed"


def test_valid_inputs_pass(tmp_path):
    """Control: the corpus' valid inputs scan and prune cleanly, so each case fails for its own reason."""
    c = Ctx(tmp_path).valid()
    code, stdout, stderr, _ = run_cli(c.prune("--json", str(tmp_path / "out" / "scores.json")))
    assert code == 0, stderr
    assert (c.out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "scores.json").is_file()
    assert leftovers(tmp_path / "out") == []


def test_debug_gives_traceback(tmp_path):
    c = Ctx(tmp_path).valid()
    c.cfg.write_text("{not json")
    res = CliRunner().invoke(app, ["--debug", *c.prune()])
    assert res.exit_code != 0
    from safeprune.errors import InputError

    assert isinstance(res.exception, InputError)  # re-raised: Python prints the traceback
    assert "adapter_config.json" in str(res.exception)


def test_debug_traceback_in_a_real_process(tmp_path):
    c = Ctx(tmp_path).valid()
    c.cfg.write_text("{not json")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    plain = subprocess.run(
        [sys.executable, "-m", "safeprune.cli", *c.prune()], capture_output=True, text=True, env=env, timeout=300
    )
    debug = subprocess.run(
        [sys.executable, "-m", "safeprune.cli", "--debug", *c.prune()],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith(f"error: {c.cfg}: not valid JSON")
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_rank_pattern_naming_absent_modules_warns(tmp_path):
    """PEFT accepts rank_pattern keys that match no module; so does safeprune, with a one-line warning."""
    import json

    from corpus import adapter_config

    c = Ctx(tmp_path).valid()
    c.cfg.write_text(json.dumps(adapter_config(rank_pattern={"gate_proj": 16}, alpha_pattern={"mlp.up_proj": 4})))
    code, stdout, stderr, _ = run_cli(["-q", *c.prune()])
    assert code == 0, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [
        f"warning: {c.cfg}: 'rank_pattern' entry 'gate_proj' matches no LoRA module; ignored",
        f"warning: {c.cfg}: 'alpha_pattern' entry 'mlp.up_proj' matches no LoRA module; ignored",
    ]
    assert (c.out / "adapter_model.safetensors").is_file()


def test_benign_pickle_loads_with_allow_pickle(tmp_path):
    import torch
    from corpus import adapter_tensors

    c = Ctx(tmp_path).valid()
    ref = adapter_tensors()
    c.st.unlink()
    torch.save(ref, c.adapter / "adapter_model.bin")
    code, _, stderr, _ = run_cli(["inspect", str(c.adapter)])
    assert code == 2 and "--allow-pickle" in stderr
    code, stdout, stderr, _ = run_cli(["inspect", str(c.adapter), "--allow-pickle"])
    assert code == 0, stderr
    assert re.search(r"8\s+LoRA modules", stdout) and "model.layers.1.self_attn.o_proj" in stdout
    from safeprune import load_adapter

    ad = load_adapter(c.adapter, allow_pickle=True)
    for k, v in ref.items():
        assert torch.equal(ad.state_dict()[k], v)


def test_pickle_never_executed_in_a_real_process(tmp_path):
    """Outside pytest's warning capture too: one line, exit 2, no marker, for both modes."""
    import pickle

    from corpus import _Evil

    c = Ctx(tmp_path).valid()
    c.st.unlink()
    with open(c.adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"w": _Evil(tmp_path / MARKER_NAME)}, f)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for extra in ([], ["--allow-pickle"]):
        p = subprocess.run(
            [sys.executable, "-m", "safeprune.cli", "inspect", str(c.adapter), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 2
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "adapter_model.bin" in p.stderr
        assert not (tmp_path / MARKER_NAME).exists()


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        p = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True, timeout=30)
        return p.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --mount --map-root-user to mount a tmpfs")
def test_real_full_disk_tmpfs(tmp_path):
    """A real full disk: the output goes to a 16 KiB tmpfs mounted in a private mount namespace."""
    c = Ctx(tmp_path).valid()
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    before = snapshot(tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    script = (
        f"mount -t tmpfs -o size=16k tmpfs {mnt} || exit 99; "
        f"{sys.executable} -m safeprune.cli prune {c.adapter} --base {c.base} -o {mnt}/pruned --top 2; "
        f'echo "rc=$?"; ls -A {mnt}'
    )
    p = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if "rc=" not in p.stdout:
        pytest.skip(f"could not mount a tmpfs: {p.stderr.strip()[:200]}")
    out_lines = p.stdout.strip().splitlines()
    rc_line = next(ln for ln in out_lines if ln.startswith("rc="))
    listing = out_lines[out_lines.index(rc_line) + 1 :]
    assert rc_line == "rc=2", p.stdout + p.stderr
    err_lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.search(
        r"^error: .*/pruned: cannot write the adapter \(No space left on device\); nothing was "
        r"written$",
        err_lines[0],
    ), err_lines[0]
    assert listing == [], f"left on the full disk: {listing}"
    assert snapshot(tmp_path / "in") == before


def test_issue_example_pattern_does_not_hang(tmp_path):
    """`(x+x+)+y` against a 32-x module name hung for minutes under `re`; it must answer at once."""
    import time

    import torch
    from corpus import PREFIX, R, adapter_config, adapter_tensors, write_adapter

    t = adapter_tensors()
    name = "model.layers.0." + "x" * 32
    t[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(R, 64)
    t[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(64, R)
    ad = write_adapter(tmp_path / "ad", t, adapter_config(rank_pattern={"(x+x+)+y": 4}))
    t0 = time.monotonic()
    code, stdout, stderr, _ = run_cli(["inspect", str(ad)])
    assert time.monotonic() - t0 < 20
    assert code == 0 and "matches no LoRA module" in stderr


def test_names_print_as_themselves(tmp_path):
    """Module names and paths holding rich markup or terminal escapes are printed escaped, never interpreted."""
    import torch
    from corpus import PREFIX, R, adapter_config, adapter_tensors, write_adapter

    t = adapter_tensors()
    name = "model.layers.0.mlp[/]\x1b]0;pwned\x07\x1b[2J"
    t[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(R, 64)
    t[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(64, R)
    ad = write_adapter(tmp_path / "ad", t, adapter_config())
    code, stdout, stderr, exc = run_cli(["inspect", str(ad)])
    assert code == 0, (stderr, exc)
    assert "\x1b" not in stdout and "\x07" not in stdout
    assert "[/]" in stdout and "\\x1b" in stdout


def test_dash_writes_the_score_table_to_stdout(tmp_path):
    c = Ctx(tmp_path).valid()
    code, stdout, stderr, _ = run_cli(["-q", "scan", str(c.adapter), "--base", str(c.base), "--json", "-"])
    assert code == 0, stderr
    assert stdout.lstrip().startswith("{") and '"rows"' in stdout
    assert not (tmp_path / "-").exists()


def test_outputs_respect_the_umask(tmp_path):
    c = Ctx(tmp_path).valid()
    old = os.umask(0o022)
    try:
        code, _, stderr, _ = run_cli(c.prune("--json", str(tmp_path / "out" / "s.json")))
    finally:
        os.umask(old)
    assert code == 0, stderr
    assert stat.S_IMODE(c.out.stat().st_mode) == 0o755
    assert stat.S_IMODE((c.out / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "s.json").stat().st_mode) == 0o644


def test_float8_lora_is_read_upcast(tmp_path):
    import torch
    from corpus import adapter_tensors, write_adapter

    c = Ctx(tmp_path).valid()
    write_adapter(c.adapter, {k: v.to(torch.float8_e4m3fn) for k, v in adapter_tensors().items()})
    code, _, stderr, exc = run_cli(c.prune())
    assert code == 0, (stderr, exc)
    assert (c.out / "adapter_model.safetensors").is_file()


def test_output_path_with_escapes_is_echoed_escaped(tmp_path):
    c = Ctx(tmp_path).valid()
    c.out = tmp_path / "out" / "p\x1b[2Jq\nr"
    code, stdout, stderr, _ = run_cli(c.prune())
    assert code == 0, stderr
    assert "\x1b" not in stdout and "\\x1b[2Jq\\nr" in stdout


def test_sigint_handler_records_then_interrupts(monkeypatch):
    import signal

    import safeprune.io.commit as commit

    monkeypatch.setattr(commit, "_SIGINT", [])
    assert not commit.sigint_seen()
    with pytest.raises(KeyboardInterrupt):
        commit.note_sigint(signal.SIGINT, None)
    assert commit.sigint_seen()


def test_entry_point_ends_an_interrupted_import_with_130(monkeypatch, capsys):
    """``safeprune`` (console.main) installs the handler first; a Ctrl-C that surfaces from loading the
    command line as ImportError ends like any Ctrl-C, and an ImportError without one is not hidden."""
    import signal

    import safeprune.io.commit as commit
    from safeprune import console

    previous = signal.getsignal(signal.SIGINT)
    try:
        for seen, expect in (([True], 130), ([], None)):
            monkeypatch.setattr(commit, "_SIGINT", seen)
            monkeypatch.setattr(commit, "note_sigint", lambda s, f: None)
            monkeypatch.delitem(sys.modules, "safeprune.cli", raising=False)
            monkeypatch.setattr("builtins.__import__", _failing_import("safeprune.cli", __import__), raising=True)
            if expect:
                with pytest.raises(SystemExit) as e:
                    console.main()
                assert e.value.code == 130 and "interrupted: no output was written" in capsys.readouterr().err
                assert signal.getsignal(signal.SIGINT) is not previous  # the recording handler is in place
            else:
                with pytest.raises(ImportError, match="initialization failed"):
                    console.main()
            monkeypatch.undo()
    finally:
        signal.signal(signal.SIGINT, previous)


def _failing_import(name, real):
    def imp(n, globals=None, locals=None, fromlist=(), level=0):
        pkg = (globals or {}).get("__package__") or ""
        full = n if level == 0 else pkg.rsplit(".", level - 1)[0] + ("." + n if n else "")
        if full == name:
            raise ImportError("initialization failed")
        return real(n, globals, locals, fromlist, level)

    return imp
