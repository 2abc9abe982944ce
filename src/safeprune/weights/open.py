"""Open whatever a user names as a model: a local Hugging Face directory (``model.safetensors``, shards
with ``model.safetensors.index.json``, or shards without an index), a single ``.safetensors`` file, a GGUF
file (or a directory holding exactly one), or a hub id from the local cache.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, UnsupportedError
from ..io.files import check_inside, check_regular_file
from ..io.jsonio import loads_bounded, read_text_bounded
from .base import WeightSource
from .gguf import GGUFSource
from .hub import looks_like_hub_id, resolve_hub_id
from .safetensors import SafetensorsSource

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_BASES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def open_dir(d: Path, root: Path | None = None) -> WeightSource:
    """Open the weights in directory ``d``. Every file read must lie inside ``root`` (default ``d``) after
    resolving symlinks; a hub cache snapshot passes its repository folder, whose blobs its links point to."""
    root = d if root is None else root

    index = d / INDEX_NAME
    if index.is_file():
        check_inside(index, root)
        try:
            idx = loads_bounded(read_text_bounded(index, "a shard index"), index, "the shard index")
            wm = idx["weight_map"]
            assert isinstance(wm, dict)
        except InputError:
            raise
        except Exception:
            raise InputError("corrupt index: expected JSON with a 'weight_map' object", index) from None
        bad = next(((k, v) for k, v in wm.items() if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise InputError(f"corrupt index: weight_map[{bad[0]!r}] is {bad[1]!r}, not a shard file name", index)
        shard_names = sorted(set(wm.values()))
        files = []
        for name in shard_names:
            f = d / name
            if not f.is_file():
                raise InputError(f"shard {name!r} named in {INDEX_NAME} is missing", d)
            check_inside(f, root)
            files.append(f)
        return SafetensorsSource(files, {k: d / v for k, v in wm.items()}, description=str(d))
    single = d / SINGLE_NAME
    if single.is_file():
        check_inside(single, root)
        return SafetensorsSource([single], description=str(d))
    shards = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if shards:
        for f in shards:
            check_inside(f, root)
        return SafetensorsSource(shards, description=str(d))
    ggufs = sorted(d.glob("*.gguf"))
    if len(ggufs) == 1:
        check_inside(ggufs[0], root)
        return GGUFSource(ggufs[0])
    if len(ggufs) > 1:
        raise InputError(f"several GGUF files; name one of them: {', '.join(p.name for p in ggufs)}", d)
    for name in _PICKLE_BASES:
        if (d / name).exists():
            raise UnsupportedError(
                f"base weights are pickled ({name}); safeprune reads safetensors or GGUF only. Convert with "
                "`model.save_pretrained(dir, safe_serialization=True)`",
                d,
            )
    raise InputError("no model weights found (expected model.safetensors, shards with an index, or a .gguf)", d)


def open_weights(spec: str | Path | WeightSource) -> WeightSource:
    """Open a base model (or aligned/unaligned model) given as a directory, a file or a hub id."""
    if isinstance(spec, WeightSource):
        return spec
    p = Path(spec)
    if p.is_dir():
        return open_dir(p)
    if p.is_file():
        if p.suffix == ".gguf":
            return GGUFSource(p)
        if p.suffix == ".safetensors":
            return SafetensorsSource([p])
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise UnsupportedError("pickled weights are refused; use safetensors or GGUF", p)
        raise InputError("unrecognised weight file (expected a directory, .safetensors or .gguf)", p)
    if p.exists():  # a FIFO, a device...
        check_regular_file(p)
    if isinstance(spec, str) and looks_like_hub_id(spec):
        snap = resolve_hub_id(spec)
        # snapshots/<rev>/file -> ../../blobs/<hash>: the repository folder is the trust root
        root = snap.parent.parent if snap.parent.name == "snapshots" else snap
        return open_dir(snap, root=root)
    raise InputError("does not exist (expected a local directory, a .safetensors/.gguf file or a hub id)", spec)
