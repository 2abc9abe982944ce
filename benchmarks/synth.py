"""Synthetic base models and PEFT adapters with real Llama layouts, for the benchmarks and their smoke test.

Bases are written as HF-style sharded bf16 safetensors with ``model.safetensors.index.json``, streamed tensor by
tensor (a safetensors header is known up front), so generating a 13 GB base needs one tensor of memory.

Weights have a decaying singular spectrum like trained matrices: a power-law low-rank head
``G1·diag(σ)·G2`` (σ_i ∝ i^-0.7, k=32 directions) on top of a Marchenko-Pastur bulk. The bulk is a slice of
one shared Gaussian pool at a random offset (a shifted slice is as good as fresh noise for a per-module scan
and costs no random draws), so a 7B base is generated in about the time it takes to write it.

The aligned/unaligned pair for pair methods (SafeLoRA, SPLoRA) is the base (aligned) and the base plus a
rank-16 "alignment removal" delta on q/k/v/o (unaligned), written the same way.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

_DT = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


@dataclass(frozen=True)
class Spec:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    shard_bytes: int = 5 * 10**9

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def with_layers(self, n: int) -> "Spec":
        return replace(self, name=f"{self.name}-{n}L", layers=n)


LLAMA2_7B = Spec("llama2-7b", 32, 4096, 11008, 32, 32, 32000, shard_bytes=10 * 10**9)
LLAMA3_8B = Spec("llama3-8b", 32, 4096, 14336, 32, 8, 128256)
TINY = Spec("tiny", 2, 64, 160, 4, 2, 128, shard_bytes=200_000)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def layer_shapes(spec: Spec) -> dict[str, tuple[int, int]]:
    h, kv, i = spec.hidden, spec.kv_dim, spec.intermediate
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def tensor_list(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in HF checkpoint order."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, spec.hidden))]
    for li in range(spec.layers):
        p = f"model.layers.{li}."
        out.append((p + "input_layernorm.weight", (spec.hidden,)))
        for k, shp in layer_shapes(spec).items():
            out.append((p + k + ".weight", shp))
        out.append((p + "post_attention_layernorm.weight", (spec.hidden,)))
    out.append(("model.norm.weight", (spec.hidden,)))
    out.append(("lm_head.weight", (spec.vocab, spec.hidden)))
    return out


class WeightGen:
    """Deterministic decaying-spectrum bf16 matrices (see module docstring)."""

    def __init__(self, seed: int = 0, pool: int = 1 << 26, head_rank: int = 32, alpha: float = 0.7):
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        self.pool = torch.randn(pool, generator=g)  # fp32; the bulk of every matrix is a slice of it
        self.k = head_rank
        self.decay = torch.arange(1, head_rank + 1, dtype=torch.float32) ** (-alpha)

    def _noise(self, numel: int) -> torch.Tensor:
        if numel <= self.pool.numel():
            off = int(torch.randint(0, self.pool.numel() - numel + 1, (1,), generator=self.gen))
            return self.pool[off : off + numel]
        reps = math.ceil(numel / self.pool.numel())
        return self.pool.repeat(reps)[:numel]

    def matrix(self, m: int, n: int) -> torch.Tensor:
        """m×n bf16 with entries of std ≈ 0.02 and a power-law head of singular values."""
        bulk_std = 0.02
        # bulk spectral edge ≈ bulk_std·(√m+√n); head σ_1 ≈ 4× the edge, decaying as i^-0.7
        edge = bulk_std * (math.sqrt(m) + math.sqrt(n))
        kk = min(self.k, m, n)
        G1 = torch.randn(m, kk, generator=self.gen) / math.sqrt(m)
        G2 = torch.randn(kk, n, generator=self.gen) / math.sqrt(n)
        W = (G1 * (4 * edge * self.decay[:kk])) @ G2
        W.view(-1).add_(self._noise(m * n), alpha=bulk_std)
        return W.to(torch.bfloat16)

    def vector(self, n: int) -> torch.Tensor:
        return (1.0 + 0.05 * self._noise(n)).to(torch.bfloat16)

    def embedding(self, m: int, n: int) -> torch.Tensor:
        # tiled bf16 pool: a 128256×4096 embedding costs one bf16 copy, no fp32 temporaries
        if getattr(self, "_pool16", None) is None:
            self._pool16 = (0.02 * self.pool).to(torch.bfloat16)
        numel = m * n
        reps = math.ceil(numel / self._pool16.numel())
        t = self._pool16 if reps == 1 else self._pool16.repeat(reps)
        return t[:numel].view(m, n)


def _nbytes(shape: tuple[int, ...], dtype=torch.bfloat16) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors_stream(
    path: Path,
    items: list[tuple[str, tuple[int, ...]]],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    dtype=torch.bfloat16,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by ``make(name, shape)``."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in items:
        nb = _nbytes(shape, dtype)
        header[name] = {"dtype": _DT[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in items:
            t = make(name, shape)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, t.shape, t.dtype)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)


def _shards(spec: Spec) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_list(spec):
        nb = _nbytes(shape)
        if shards[-1] and size + nb > spec.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def write_base(
    out: Path, spec: Spec, seed: int = 0, delta: Callable[[str, torch.Tensor], torch.Tensor] | None = None
) -> Path:
    """A sharded bf16 Llama-layout base (config.json, shards, index). ``delta`` may edit each matrix."""
    out.mkdir(parents=True, exist_ok=True)
    gen = WeightGen(seed)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return gen.vector(shape[0])
        if "embed_tokens" in name or name == "lm_head.weight":
            return gen.embedding(*shape)
        W = gen.matrix(*shape)
        return delta(name, W) if delta is not None else W

    shards = _shards(spec)
    n = len(shards)
    weight_map, total = {}, 0
    for i, items in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors_stream(out / fname, items, make)
        for name, shape in items:
            weight_map[name] = fname
            total += _nbytes(shape)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": spec.hidden,
                "intermediate_size": spec.intermediate,
                "num_hidden_layers": spec.layers,
                "num_attention_heads": spec.heads,
                "num_key_value_heads": spec.kv_heads,
                "vocab_size": spec.vocab,
                "torch_dtype": "bfloat16",
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "_synthetic": f"safeprune benchmarks/synth.py {spec.name} seed={seed}",
            },
            indent=2,
        )
    )
    return out


def unaligned_delta(
    rank: int = 16, rel: float = 0.05, seed: int = 1, targets: tuple[str, ...] = ATTN
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """W -> W + a rank-``rank`` perturbation of relative Frobenius size ``rel`` on the ``targets`` projections
    (default q/k/v/o; a stand-in for what removing safety alignment changes); other matrices are left as
    they are."""
    g = torch.Generator().manual_seed(seed)

    def f(name: str, W: torch.Tensor) -> torch.Tensor:
        if not any(f".{p}." in name for p in targets):
            return W
        m, n = W.shape
        U = torch.randn(m, rank, generator=g)
        V = torch.randn(rank, n, generator=g)
        D = U @ V
        Wf = W.float()
        D *= rel * float(Wf.norm()) / float(D.norm())
        return (Wf + D).to(torch.bfloat16)

    return f


def adapter_modules(
    spec: Spec, targets: tuple[str, ...], layers: range | None = None
) -> Iterator[tuple[str, int, int]]:
    shapes = layer_shapes(spec)
    for li in layers if layers is not None else range(spec.layers):
        for key, (out_f, in_f) in shapes.items():
            if key.split(".")[1] in targets:
                yield f"model.layers.{li}.{key}", out_f, in_f


def write_adapter(
    out: Path, spec: Spec, targets: tuple[str, ...], r: int, alpha: float, seed: int = 2, layers: range | None = None
) -> Path:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, float32) for ``spec``.

    Half of the modules get a B whose columns lie mostly in a random low-dimensional space and half a
    spread-out B, so scores differ across modules the way trained adapters' do."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, out_f, in_f) in enumerate(adapter_modules(spec, targets, layers)):
        A = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
        if i % 2:
            B = torch.randn(out_f, r, generator=g) * 0.01
        else:
            B = torch.randn(out_f, 1, generator=g) @ torch.randn(1, r, generator=g) * 0.01
            B += 0.001 * torch.randn(out_f, r, generator=g)
        pre = f"base_model.model.{name}"
        tensors[pre + ".lora_A.weight"] = A.contiguous()
        tensors[pre + ".lora_B.weight"] = B.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "base_model_name_or_path": f"synthetic/{spec.name}",
        "inference_mode": True,
    }
    if layers is not None:
        cfg["layers_to_transform"] = list(layers)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def layered_models(work: Path, spec0: Spec, layers: int) -> tuple[Spec, Path, Path]:
    """``spec0`` cut to ``layers`` layers, its base and its q/k/v/o adapter (r = 8), as the repair benchmarks build
    them: ``work/base{L}`` and ``work/ad{L}`` (gpu_checks.sh points both at one work folder)."""
    spec = spec0.with_layers(layers)
    base = write_base(work / f"base{layers}", spec)
    return spec, base, write_adapter(work / f"ad{layers}", spec, ATTN, r=8, alpha=16)


def write_results(out: Path, res: dict, render: Callable[[dict], str]) -> dict:
    """A benchmark's results as ``out``.json and its rendered Markdown as ``out``.md; ``res`` returned."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(res))
    return res


def run_worker(script: Path, kind: str, args: dict) -> dict:
    """Run ``python SCRIPT _worker KIND ARGS_JSON`` in a fresh process and return the JSON it prints last.

    The benchmarks measure each approach in its own process, so that peak RSS (VmHWM) is per approach."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "_worker", kind, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
