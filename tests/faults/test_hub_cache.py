"""Hub ids resolve to a Hugging Face cache snapshot whose files are symlinks into ../../blobs: those links
stay inside the repository's cache folder and are followed; a link that leaves it is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from corpus import Ctx
from typer.testing import CliRunner

from safeprune.cli import app


def fake_cache(cache: Path, base_dir: Path, repo: str = "org/tiny", rev: str = "0" * 40) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    blobs, snap = folder / "blobs", folder / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    for i, f in enumerate(sorted(base_dir.iterdir())):
        blob = blobs / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    c = Ctx(tmp_path).valid()
    cache = tmp_path / "hf-cache"
    snap = fake_cache(cache, c.base)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c, snap


def test_hub_snapshot_symlinks_into_blobs_are_followed(hub):
    c, snap = hub
    res = CliRunner().invoke(app, ["-q", "scan", str(c.adapter), "--base", "org/tiny"])
    assert res.exit_code == 0, res.stderr


def test_hub_snapshot_link_leaving_the_repo_folder_is_refused(hub, tmp_path):
    c, snap = hub
    st = snap / "model.safetensors"
    st.unlink()
    st.symlink_to(c.base / "model.safetensors")  # outside models--org--tiny
    res = CliRunner().invoke(app, ["-q", "scan", str(c.adapter), "--base", "org/tiny"])
    assert res.exit_code == 2
    assert "Traceback" not in res.stderr
    assert (
        f"error: {st}: is a symbolic link to {c.base / 'model.safetensors'}, outside the input directory"
        in res.stderr.strip()
    )


def test_hub_id_not_in_cache_offline(hub):
    c, _ = hub
    res = CliRunner().invoke(app, ["-q", "scan", str(c.adapter), "--base", "org/absent"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: org/absent: not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    )
