"""Writing an adapter directory atomically.

The new adapter is assembled in a temporary sibling directory (``.NAME.safeprune-tmp-XXXX``) and renamed
into place only when every file is written and flushed, so a crash, a full disk or Ctrl-C never leaves a
half-written adapter that a server could load. The input adapter directory is never overwritten, nor
anything inside it or containing it; an existing output is replaced only with ``force=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter
from .errors import OutputError, OutputExistsError, UsageError

MANIFEST_NAME = "safeprune.json"
# side files of an adapter directory that are copied to the output unchanged
COPY_FILES = (
    "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_path(out_dir: Path, inputs: list[Path], force: bool) -> None:
    out = Path(os.path.realpath(out_dir))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if _is_within(out, real_in):
            raise UsageError(f"output {out_dir} is inside the input {inp}; choose another output directory")
        if _is_within(real_in, out):
            raise UsageError(f"output {out_dir} contains the input {inp}; choose another output directory")
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise OutputExistsError(f"output {out_dir} already exists; pass --force to replace it")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise UsageError(f"output {out_dir} exists and is not a directory; refusing to replace it")


def local_inputs(*specs) -> list[Path]:
    """The inputs given as local paths (hub ids and None are skipped): what outputs must stay clear of."""
    out = []
    for s in specs:
        if isinstance(s, (str, Path)) and Path(s).exists():
            out.append(Path(s))
    return out


def check_output_file(path: Path | None, inputs: list[Path], *, not_equal: list[Path] = ()) -> None:
    """A side output (--json/--csv/--plot) may replace a file of its own, but never an input, a file inside
    an input directory, a directory, or the adapter output itself."""
    if path is None:
        return
    real = Path(os.path.realpath(path))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if _is_within(real, real_in) or _is_within(real_in, real):
            raise UsageError(f"output {path} would write into or over the input {inp}; choose another path")
    for other in not_equal:
        if other is not None and real == Path(os.path.realpath(other)):
            raise UsageError(f"output {path} is also the adapter output directory; choose another path")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; give a file name")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_adapter(adapter: LoraAdapter, out_dir: str | Path, *, force: bool = False,
                  extra_inputs: list[Path] | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    inputs = ([adapter.path] if adapter.path else []) + list(extra_inputs or [])
    check_output_path(out, inputs, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.safeprune-tmp-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create the output directory ({e.strerror or e}); nothing was written",
                          out) from None
    try:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
        meta = dict(adapter.metadata or {})
        meta["format"] = "pt"
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2) + "\n", encoding="utf-8")
        if adapter.path:
            for name in COPY_FILES:
                src = adapter.path / name
                if src.is_file() and not src.is_symlink():
                    shutil.copyfile(src, tmp / name)
        if adapter.manifest is not None:
            from .table import _json_default

            (tmp / MANIFEST_NAME).write_text(
                json.dumps(adapter.manifest, indent=2, default=_json_default) + "\n", encoding="utf-8"
            )
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.safeprune-old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write the adapter ({e.strerror or e}); nothing was written", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
