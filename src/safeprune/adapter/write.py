"""Writing an adapter directory atomically.

The new adapter is assembled in a temporary sibling directory (``.NAME.safeprune-tmp-XXXX``) and renamed
into place only when every file is written and flushed, so a crash, a full disk or Ctrl-C never leaves a
half-written adapter that a server could load. The input adapter directory is never overwritten, nor
anything inside it or containing it; an existing output is replaced only with ``force=True``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch

from ..errors import OutputError
from ..io.commit import Outputs
from ..io.files import (
    fsync_tree_files,
    json_default,
    make_temp_dir,
    umask_modes,
)
from ..io.outputs import check_output_path
from .card import model_card
from .names import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME

# side files of an adapter directory that are copied to the output unchanged
COPY_FILES = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def stage_adapter(
    adapter: Any, out_dir: str | Path, outputs: Outputs, *, force: bool = False, extra_inputs: list[Path] | None = None
) -> Path:
    """Write ``adapter`` completely into a temporary directory beside ``out_dir`` and stage it in ``outputs``
    (it becomes ``out_dir`` when ``outputs`` is committed, together with the command's other outputs)."""
    out = Path(out_dir)
    inputs = ([adapter.path] if adapter.path else []) + list(extra_inputs or [])
    check_output_path(out, inputs, force)
    tmp = make_temp_dir(out)
    outputs.stage_dir(tmp, out, replace=force)
    try:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
        meta = dict(adapter.metadata or {})
        meta["format"] = "pt"
        safetensors.torch.save_file(sd, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2) + "\n", encoding="utf-8")
        if adapter.path:
            for name in COPY_FILES:
                src = adapter.path / name
                if src.is_file() and not src.is_symlink():
                    shutil.copyfile(src, tmp / name)
        if adapter.manifest is not None:
            (tmp / MANIFEST_NAME).write_text(
                json.dumps(adapter.manifest, indent=2, default=json_default) + "\n", encoding="utf-8"
            )
            # the card says what the edit did (PEFT's boilerplate card, copied above, says nothing)
            card = tmp / "README.md"
            original = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
            card.write_text(
                model_card(
                    json.loads(json.dumps(adapter.manifest, default=json_default)), adapter.config, out.name, original
                ),
                encoding="utf-8",
            )
        umask_modes(tmp)
        fsync_tree_files(tmp)
    except OSError as e:
        raise OutputError(f"cannot write the adapter ({e.strerror or e}); nothing was written", out) from None
    return out


def write_adapter(
    adapter: Any, out_dir: str | Path, *, force: bool = False, extra_inputs: list[Path] | None = None
) -> Path:
    """Write ``adapter`` (a :class:`~safeprune.adapter.LoraAdapter`) as a PEFT adapter directory, with its
    manifest as ``safeprune.json`` when it has one; atomically (see :mod:`safeprune.io.commit`)."""
    with Outputs() as outputs:
        out = stage_adapter(adapter, out_dir, outputs, force=force, extra_inputs=extra_inputs)
        outputs.commit()
    return out
