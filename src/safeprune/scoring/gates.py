"""Component gates on a PEFT model: the model side of ``safeprune repair`` (issue 13).

A LoRA module's update is ΔW = s·B·A = Σ_i s·b_i·a_iᵀ, a sum of r rank-1 components. With the factors
orthogonalised (``edit.components.orthogonalise``: component i = i-th singular direction of ΔW) the
components are separable, and a gate vector g ∈ [0, 1]^r on the module multiplies component i by g_i:
the module computes s·B·diag(g)·A·x. The gate is applied by a forward pre-hook on ``lora_B`` that scales
its input (the r-dimensional A·x) by g, so one backward pass gives ∂L/∂g_i for every component of every
module, and the gates written into lora_B's columns (``edit.components.gate_components``) give the same
model as a normal PEFT adapter.

The objectives are teacher-forced negative log-likelihoods (mean over the target tokens of each item):
NLL(target | prompt) for a refusal target on harmful prompts, for the same refusal on harmless prompts,
and for the task's reference answer on task prompts. :meth:`ComponentGates.nll` computes them in
batches and, when asked, back-propagates each batch at once (memory bounded by one batch). With ``checkpoint=True``
each decoder layer keeps only its input for the backward pass and recomputes its inside (PyTorch activation
checkpointing, non-reentrant, through transformers' per-layer hook): the activations held for a batch grow by
one hidden state per layer instead of every intermediate of every layer, for one extra forward per backward.
With ``offload`` (``cpu`` from an accelerator, or ``disk``; :mod:`safeprune.io.offload`) that one input per layer
leaves the device too, so what the fit holds above the loaded model no longer grows with the number of layers;
the spilled inputs are read back bit for bit (same gradients).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from ..adapter import LoraAdapter
from ..errors import InputError, UsageError
from ..io.devices import resolve_device
from ..io.offload import DiskSpill, check_offload, saved_tensors


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


# ``checkpoint=None`` turns activation checkpointing on from this many parameters (a 7B fit holds gigabytes
# of activations per batch without it; below, the recompute's extra forward is not worth it)
AUTO_CHECKPOINT_PARAMS = 1_000_000_000


class ComponentGates:
    """The base with ``adapter`` attached by PEFT, its factors replaced by ``factors`` (same names and
    shapes, e.g. the orthogonalised adapter), and one gate vector (length r, all ones) per LoRA module.
    ``close()`` removes the hooks."""

    def __init__(
        self,
        base: Any,
        adapter: LoraAdapter,
        factors: LoraAdapter | None = None,
        *,
        pad_id: int = 0,
        checkpoint: bool | None = None,
        device: str = "cpu",
        offload: str = "none",
    ):
        if adapter.path is None:
            raise UsageError("component gates load the adapter with PEFT: give an adapter directory")
        self.device = resolve_device(device)
        check_offload(offload, str(self.device), checkpoint)
        self.offload = offload
        self._spill: DiskSpill | None = None
        self.pad_id = pad_id
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, str(adapter.path)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        name_ = self.model.active_adapter
        key = name_ if isinstance(name_, str) else self.model.active_adapters[0]
        factors = factors or adapter
        self.gates: dict[str, torch.nn.Parameter] = {}
        self._handles: list[Any] = []
        for mname, mod in self.model.named_modules():
            if not isinstance(mod, LoraLayer) or key not in mod.lora_B:
                continue
            if key in getattr(mod, "lora_variant", {}):
                raise UsageError(f"component gates support plain LoRA only ({mname} uses a LoRA variant)")
            name = mname.removeprefix("base_model.model.")
            if name not in factors.modules:
                self.close()
                raise InputError(f"PEFT module {name} is not in the adapter's tensors", adapter.path)
            m = factors.modules[name]
            lb, la = mod.lora_B[key].weight, mod.lora_A[key].weight
            if tuple(lb.shape) != tuple(m.lora_B.shape) or tuple(la.shape) != tuple(m.lora_A.shape):
                self.close()
                raise InputError(f"module {name}: factor shapes differ from the loaded adapter's", adapter.path)
            lb.data.copy_(m.lora_B.to(lb.dtype))
            la.data.copy_(m.lora_A.to(la.dtype))
            g = self.gates[name] = torch.nn.Parameter(torch.ones(m.r, device=self.device))
            self._handles.append(mod.lora_B[key].register_forward_pre_hook(self._hook(g)))
        missing = set(factors.modules) - set(self.gates)
        if missing:
            self.close()
            raise InputError(f"PEFT did not attach {len(missing)} module(s), e.g. {sorted(missing)[0]}", adapter.path)
        self.model.to(self.device)
        if checkpoint is None:  # auto: on for models of a billion parameters or more, and with offloading
            checkpoint = offload != "none" or sum(p.numel() for p in self.model.parameters()) >= AUTO_CHECKPOINT_PARAMS
        self.checkpoint = bool(checkpoint)
        if self.checkpoint:
            self._enable_checkpointing(base)

    def _enable_checkpointing(self, base: Any) -> None:
        """Checkpoint every decoder layer while the model stays in eval mode (dropout off): transformers only
        checkpoints a layer whose own ``training`` flag is set, so that flag alone is set on the layers."""
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:  # transformers < 4.52
            self.close()
            raise UsageError("activation checkpointing needs transformers >= 4.52") from None
        inner = self.model.get_base_model()
        layers = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not getattr(inner, "supports_gradient_checkpointing", False) or not layers:
            self.close()
            raise UsageError(f"{type(inner).__name__} ({base}) does not support activation checkpointing")
        enable = getattr(inner, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for m in layers:
            m.training = True  # the flag only, not its submodules: LoRA dropout stays off
        if self.offload != "none":
            self._spill = DiskSpill() if self.offload == "disk" else None
            for m in layers:
                m._gradient_checkpointing_func = self._offloaded(m._gradient_checkpointing_func)

    def _offloaded(self, ckpt: Any) -> Any:
        """The layer's checkpoint call with the tensors it saves (the layer's input; the inside of the layer is
        recomputed, not saved) sent where ``offload`` says."""
        pin = self.device.type == "cuda"

        def call(*args: Any, **kwargs: Any) -> Any:
            with saved_tensors(self.offload, self._spill, pin_memory=pin):
                return ckpt(*args, **kwargs)

        return call

    @staticmethod
    def _hook(g: torch.nn.Parameter):
        def hook(module, args):
            return (args[0] * g.to(args[0].dtype),) + tuple(args[1:])

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self, "_spill", None) is not None:
            self._spill.close()

    # -- gate values ---------------------------------------------------------------------------------

    def values(self) -> dict[str, torch.Tensor]:
        """The gates as CPU tensors (wherever the model runs)."""
        return {k: g.detach().to("cpu", copy=True) for k, g in self.gates.items()}

    def set(self, values: dict[str, torch.Tensor] | float) -> None:
        for k, g in self.gates.items():
            if isinstance(values, (int, float)):
                g.data.fill_(float(values))
            else:
                g.data.copy_(torch.as_tensor(values[k], dtype=g.dtype))

    @contextmanager
    def at(self, values: dict[str, torch.Tensor] | float) -> Iterator[ComponentGates]:
        old = self.values()
        try:
            self.set(values)
            yield self
        finally:
            self.set(old)

    def zero_grad(self) -> None:
        for g in self.gates.values():
            g.grad = None

    def grads(self) -> dict[str, torch.Tensor]:
        return {
            k: (g.grad.detach().to("cpu", copy=True) if g.grad is not None else torch.zeros(g.shape))
            for k, g in self.gates.items()
        }

    # -- objectives ----------------------------------------------------------------------------------

    def nll(
        self,
        prompts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        *,
        batch_size: int = 16,
        weight: float = 0.0,
        adapter: bool = True,
    ) -> torch.Tensor:
        """Per-item mean NLL of ``targets[i]`` after ``prompts[i]`` (float64, detached). With ``weight`` ≠ 0,
        ``weight · mean over items`` is back-propagated batch by batch into the gates' ``.grad``."""
        if len(prompts) != len(targets) or not prompts:
            raise UsageError("nll needs as many targets as prompts, and at least one")
        if any(not t for t in targets):
            raise UsageError("every target needs at least one token")
        out = []
        n = len(prompts)
        ctx = self.model.disable_adapter() if not adapter else _null()
        with ctx:
            for s in range(0, n, batch_size):
                P, T = prompts[s : s + batch_size], targets[s : s + batch_size]
                ids, mask = _pad_right([list(p) + list(t) for p, t in zip(P, T)], self.pad_id)
                labels = torch.full_like(ids, -100)
                for row, (p, t) in enumerate(zip(P, T)):
                    labels[row, len(p) : len(p) + len(t)] = torch.tensor(list(t), dtype=torch.long)
                ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
                grad = weight != 0 and adapter
                with torch.set_grad_enabled(grad):
                    logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                    lab = labels[:, 1:]
                    if logits.dtype != torch.float64:
                        logits = logits.float()  # float32 or better
                    tok = torch.nn.functional.cross_entropy(
                        logits.transpose(1, 2), lab, reduction="none", ignore_index=-100
                    )
                    per = tok.sum(1) / (lab != -100).sum(1)
                    if grad:
                        (weight * per.sum() / n).backward()
                out.append(per.detach().double().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        batch_size: int = 16,
        adapter: bool = True,
        eos_id: int | None = None,
    ) -> list[list[int]]:
        """Greedy continuations (token ids, EOS and what follows cut) with the gates as set; left padding,
        prompts sorted by length."""
        res: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        ctx = self.model.disable_adapter() if not adapter else _null()
        with ctx:
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(idx):
                    L = len(prompts[i])
                    ids[row, width - L :] = torch.tensor(list(prompts[i]), dtype=torch.long)
                    mask[row, width - L :] = 1
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    eos_token_id=eos_id,
                )
                for row, i in enumerate(idx):
                    seq = out[row, width:].tolist()
                    if eos_id is not None and eos_id in seq:
                        seq = seq[: seq.index(eos_id)]
                    res[i] = seq
        return res


@contextmanager
def _null():
    yield
