#!/usr/bin/env python3
"""The scripted newcomer pass (`make check-newcomer`): a fresh clone, the README's Quickstart commands in order.

1. ``git clone`` this repository (its committed HEAD) into a temporary folder whose parent also holds ``shared``
   (a link to the shared data/testbed folder), as CI lays it out;
2. the clone's virtual environment: created by the Makefile as a newcomer's would be (the default), or, with
   ``SAFEPRUNE_NEWCOMER_VENV=DIR`` (an existing environment with safeprune's dependencies), a fresh ``.venv``
   that borrows DIR's packages and runs the clone's own code — nothing is installed into DIR;
3. every command of the README's Quickstart code block (parsed from README.md, so the list cannot drift), in
   order, in the clone; the pass fails if a command fails or prints a Python traceback.

Only the standard library is used (it runs before any environment exists). Exit status: 0 when every command
passed, 1 otherwise, 2 for a setup error. ``--keep`` keeps the clone; ``--only N`` runs the first N commands.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
VENV_ENV = "SAFEPRUNE_NEWCOMER_VENV"


def quickstart_commands(readme: str) -> list[str]:
    """The commands of the first code block under ``## Quickstart``, comments removed, in order."""
    m = re.search(r"^## Quickstart\s*$(.*?)(?=^## )", readme, re.M | re.S)
    if m is None:
        raise ValueError("README.md has no '## Quickstart' section")
    block = re.search(r"^```[^\n]*\n(.*?)^```", m.group(1), re.M | re.S)
    if block is None:
        raise ValueError("the Quickstart section has no code block")
    cmds = []
    for line in block.group(1).splitlines():
        cmd = line.split(" #", 1)[0].strip()
        if cmd and not cmd.startswith("#"):
            cmds.append(cmd)
    if not cmds:
        raise ValueError("the Quickstart code block holds no command")
    return cmds


def shared_dir() -> Path | None:
    """The shared data/testbed folder: ``$SAFEPRUNE_DATA/..``, else ``shared`` beside this checkout."""
    cands = []
    if os.environ.get("SAFEPRUNE_DATA"):
        cands.append(Path(os.environ["SAFEPRUNE_DATA"]).resolve().parent)
    cands.append(ROOT.parent / "shared")
    return next((c for c in cands if c.is_dir()), None)


def borrow_venv(clone: Path, donor: Path) -> None:
    """A fresh ``clone/.venv`` whose Python sees the clone's ``src`` first, then ``donor``'s packages (via a
    .pth file), with a ``safeprune`` executable; stamped as installed so ``make`` installs nothing."""
    donor_py = donor / "bin" / "python"
    if not donor_py.is_file():
        raise SystemExit(f"error: {VENV_ENV}={donor}: no bin/python there")
    site = subprocess.run(
        [str(donor_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    venv = clone / ".venv"
    # the donor's interpreter is the base, so the packages compiled for it load
    base = subprocess.run(
        [str(donor_py), "-c", "import sys; print(sys._base_executable)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    own_site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own_site, "_safeprune_newcomer.pth").write_text(f"{clone / 'src'}\n{site}\n")
    for tool in ("ruff", "lint-imports", "pytest"):
        if (donor / "bin" / tool).is_file():
            (venv / "bin" / tool).symlink_to(donor / "bin" / tool)
    exe = venv / "bin" / "safeprune"
    exe.write_text(f"#!{venv / 'bin' / 'python'}\nfrom safeprune.console import main\n\nmain()\n")
    exe.chmod(0o755)
    (venv / ".installed").touch()  # the Makefile's stamp: newer than the clone's pyproject.toml


def run_command(cmd: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[int, bool, float]:
    """Run one command (bash), its output to the terminal and to ``log``; (exit status, traceback seen, s)."""
    t0 = time.monotonic()
    seen = False
    with open(log, "w", encoding="utf-8") as f:
        p = subprocess.Popen(
            ["bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert p.stdout is not None
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
            seen = seen or TRACEBACK in line
        rc = p.wait()
    return rc, seen, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--only", type=int, default=None, help="run only the first N commands")
    ap.add_argument("--workdir", type=Path, default=None, help="where the clone goes (default: a temp folder)")
    a = ap.parse_args(argv)
    try:
        cmds = quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: README.md: {e}", file=sys.stderr)
        return 2
    cmds = cmds[: a.only] if a.only else cmds
    shared = shared_dir()
    top = Path(tempfile.mkdtemp(prefix="safeprune-newcomer-", dir=a.workdir))
    clone = top / "safeprune"
    ok = True
    try:
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
        if shared is not None:
            (top / "shared").symlink_to(shared)
        else:
            print("note: no shared folder found: the clone runs without ../shared (tests needing it skip)")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the clone's code, not this checkout's
        donor = os.environ.get(VENV_ENV)
        if donor:
            borrow_venv(clone, Path(donor))
            print(f"using the packages of {donor} (nothing installed there); the clone's own code")
        print(f"fresh clone: {clone}\nREADME Quickstart, in order: {' ; '.join(cmds)}")
        results = []
        for i, cmd in enumerate(cmds, 1):
            print(f"\n=== [{i}/{len(cmds)}] {cmd}", flush=True)
            rc, tb, secs = run_command(cmd, clone, env, top / f"command{i}.log")
            passed = rc == 0 and not tb
            ok = ok and passed
            results.append((cmd, rc, tb, secs))
            if not passed:
                break
        print("\nnewcomer pass:")
        for cmd, rc, tb, secs in results:
            what = "ok" if rc == 0 and not tb else ("printed a Python traceback" if tb else f"exit status {rc}")
            print(f"  {cmd:<24} {what} ({secs:.0f} s)")
        for cmd in cmds[len(results) :]:
            print(f"  {cmd:<24} not run")
        print("PASSED" if ok else "FAILED")
    except subprocess.CalledProcessError as e:
        print(f"error: setting up the clone failed: {e}", file=sys.stderr)
        return 2
    finally:
        if a.keep:
            print(f"kept: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
