"""The model side of activation-aware scoring: a base model with a PEFT adapter attached, forward hooks that
capture the residual stream at the last prompt token, and one gate per LoRA module whose gradient is the
module's attribution (used by the ``actdir`` method; see its docstring for the maths)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from ..errors import InputError, UsageError
from ..weights.resolve import resolve_model

RESIDUAL_TYPES = ("o_proj", "down_proj")  # LoRA modules whose output is added to the residual stream as is


# -- model plumbing -------------------------------------------------------------------------------------


def encode(tokenizer, prompts: Sequence[str], max_length: int = 256, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt as the model sees it in a chat: the user message (cut to ``max_length``
    tokens first, so the template and the assistant-turn opening are never cut off) in the chat template
    with the generation prompt. Without a chat template: the plain prompt (cut to ``max_length``)."""
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            p = tokenizer.decode(ids[:max_length], skip_special_tokens=True)
        if use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"][: max_length + 2]
        if not ids:
            raise InputError("a probe prompt encodes to no tokens", "probes")
        out.append(list(ids))
    return out


def _decoder_layers(model) -> torch.nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise InputError(f"cannot find the {n} decoder layers of the model", "base")


def _batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    """Right-padded batches (sorted by length: less padding); yields (input_ids, attention_mask, last index)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        yield ids, mask, mask.sum(1) - 1


class _Capture:
    """Forward hooks on the decoder layers that keep each layer's output at the last prompt token."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.last: torch.Tensor | None = None
        self.acts: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        self.acts.append(h[torch.arange(h.shape[0]), self.last])

    def run(self, model, ids, mask, last) -> torch.Tensor:
        """(batch, L, hidden) residual stream after each layer at the last token."""
        self.last, self.acts = last, []
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        out = torch.stack(self.acts, dim=1)
        self.acts = []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Attribution:
    """The model with the adapter loaded by PEFT, hooks that capture the residual stream at the last
    prompt token, and one gate per LoRA module. ``direction()`` (adapter off), then ``objective()`` /
    ``attribute()`` (adapter on, gates as set; ``gated({...})`` sets some for a while). ``close()``
    removes every hook."""

    def __init__(
        self,
        base: str | Path,
        adapter: Any,
        harmful: list[list[int]],
        harmless: list[list[int]],
        *,
        pad_id: int = 0,
        batch_size: int = 16,
        layers: Sequence[int] | None = None,
    ):
        self.ad, self.harmful, self.harmless = adapter, harmful, harmless
        self.pad_id, self.batch_size = pad_id, batch_size
        self._handles: list[Any] = []
        ref = resolve_model(str(base))
        model = AutoModelForCausalLM.from_pretrained(ref.directory, dtype=torch.float32, **ref.kwargs())
        self.model = model = PeftModel.from_pretrained(model, str(adapter.path)).eval()
        name_ = model.active_adapter
        adapter_name = name_ if isinstance(name_, str) else model.active_adapters[0]
        for p in model.parameters():
            p.requires_grad_(False)
        dec = _decoder_layers(model)
        self.n_layers = n = len(dec)
        use = list(range(1, n + 1)) if layers is None else sorted(set(int(x) for x in layers))
        if not use or use[0] < 1 or use[-1] > n:
            raise UsageError(f"layers must be in 1..{n}, got {list(layers or [])}")
        self.layers = use
        self.w = torch.zeros(n)
        self.w[[i - 1 for i in use]] = 1.0
        self.cap = _Capture(dec)
        self.r_hat: torch.Tensor | None = None
        self.r_norm: torch.Tensor | None = None
        self.gates: dict[str, torch.nn.Parameter] = {}
        self.scaling: dict[str, float] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self._cur: dict[str, Any] = {"last": None, "record": False}
        for mname, mod in model.named_modules():
            if not isinstance(mod, LoraLayer) or adapter_name not in mod.lora_B:
                continue
            if adapter_name in getattr(mod, "lora_variant", {}):
                raise UsageError(f"actdir supports plain LoRA only ({mname} uses a LoRA variant such as DoRA)")
            name = mname.removeprefix("base_model.model.")
            if name not in adapter.modules:
                raise InputError(f"PEFT module {name} is not in the adapter's tensors", adapter.path)
            g = self.gates[name] = torch.nn.Parameter(torch.ones(()))
            self.scaling[name] = float(mod.scaling[adapter_name])
            residual = adapter.modules[name].module_type in RESIDUAL_TYPES
            self._handles.append(mod.lora_B[adapter_name].register_forward_hook(self._gate_hook(name, g, residual)))
        missing = set(adapter.modules) - set(self.gates)
        if missing:
            self.close()
            raise InputError(
                f"PEFT did not attach {len(missing)} adapter module(s), e.g. {sorted(missing)[0]}", adapter.path
            )

    def _gate_hook(self, name: str, g: torch.nn.Parameter, residual: bool):
        cur, kept = self._cur, self.kept

        def hook(module, args, output):
            if cur["record"] and residual:
                kept.setdefault(name, []).append(output.detach()[torch.arange(output.shape[0]), cur["last"]])
            return output * g

        return hook

    def close(self) -> None:
        self.cap.close()
        for h in self._handles:
            h.remove()
        self._handles = []

    tick: Any = None  # called after every batch (a progress bar's advance), or None

    def batches(self, seqs: list[list[int]]) -> int:
        return -(-len(seqs) // self.batch_size)

    def _acts(self, seqs: list[list[int]]):
        for ids, mask, last in _batches(seqs, self.batch_size, self.pad_id):
            if self.tick is not None:
                self.tick()
            self._cur["last"] = last
            yield self.cap.run(self.model, ids, mask, last)

    def direction(self) -> torch.Tensor:
        """r̂ (L, hidden): unit refusal direction per layer, from the base with the adapter disabled."""
        means = []
        with torch.no_grad(), self.model.disable_adapter():
            for seqs in (self.harmful, self.harmless):
                tot = sum(h.double().sum(0) for h in self._acts(seqs))
                means.append(tot / len(seqs))
        r = means[0] - means[1]
        self.r_norm = r.norm(dim=1)
        if not torch.all(self.r_norm > 0):
            raise InputError("the harmful and harmless probes give the same mean activation at some layer", "probes")
        self.r_hat = (r / self.r_norm[:, None]).float()
        return self.r_hat

    def objective(self, backward: bool = False, record: bool = False) -> float:
        """J with the adapter on and the gates as they are; ``backward`` accumulates ∂J/∂g in the gates."""
        if self.r_hat is None:
            self.direction()
        total, n = 0.0, len(self.harmful)
        self._cur["record"] = record
        try:
            with torch.set_grad_enabled(backward):
                for h in self._acts(self.harmful):
                    j = ((h * self.r_hat[None]).sum(-1) * self.w[None]).sum() / n
                    if backward:
                        j.backward()
                    total += float(j.detach())
        finally:
            self._cur["record"] = False
        return total

    def attribute(self) -> tuple[float, dict[str, float], dict[str, float]]:
        """(J, actdir = −∂J/∂g per module, direct term per module (NaN where not defined))."""
        for g in self.gates.values():
            g.grad = None
        self.kept.clear()
        j = self.objective(backward=True, record=True)
        score = {k: (-float(g.grad) if g.grad is not None else 0.0) for k, g in self.gates.items()}
        direct: dict[str, float] = {}
        n = len(self.harmful)
        for name in self.gates:
            layer = self.ad.modules[name].layer
            if name not in self.kept or layer is None:
                direct[name] = float("nan")
                continue
            delta = torch.cat(self.kept[name]).double() * self.scaling[name]  # LoRA output added to h_{layer+1}
            after = [i for i in range(layer + 1, self.n_layers + 1) if self.w[i - 1] > 0]
            proj = delta @ self.r_hat[[i - 1 for i in after]].double().T if after else delta[:, :0]
            direct[name] = -float(proj.sum()) / n
        self.kept.clear()
        return j, score, direct

    def gated(self, values: dict[str, float]):
        """Context manager: these gates at these values, restored on exit."""

        @contextmanager
        def ctx():
            old = {k: float(self.gates[k].data) for k in values}
            try:
                for k, v in values.items():
                    self.gates[k].data.fill_(v)
                yield self
            finally:
                for k, v in old.items():
                    self.gates[k].data.fill_(v)

        return ctx()
