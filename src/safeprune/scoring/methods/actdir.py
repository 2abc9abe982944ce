"""``actdir``: refusal-direction attribution, an activation-aware module score (needs the model and a few
probe prompts, no labels beyond "harmful" / "harmless").

1. Refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single
   direction"): on the aligned base with the adapter disabled, r_l = mean over harmful probes of the
   residual stream h_l at the last prompt token (chat template applied with ``add_generation_prompt``,
   so that token opens the assistant turn) minus the same mean over harmless probes; r̂_l = r_l/‖r_l‖.
   h_l (l = 1..L) is the output of decoder layer l, before the final norm (captured with forward hooks
   on the decoder layers, so it is the residual stream itself for every layer).
2. Attribution: every LoRA module m gets a scalar gate g_m (= 1) on its LoRA output (a forward hook on
   ``lora_B[adapter]`` multiplies its output, which PEFT then scales and adds to the base output). With
   the adapter on, J = (1/N) Σ_probes Σ_l w_l ⟨h_l[last], r̂_l⟩ over the N harmful probes (w_l = 1 by
   default: ``layers`` picks a subset). One backward pass gives ∂J/∂g_m for every module; removing m
   (g_m: 1 → 0) changes J by ≈ −∂J/∂g_m. The score is ``actdir = −∂J/∂g_m``: high = the module pushes
   the harmful prompts' activations away from refusal = prune first.

Extra columns: ``actdir_abs`` = |actdir|; ``actdir_direct`` = the module's own output at the last token
projected on r̂ of the layers it writes into (only for modules that add to the residual stream directly,
``o_proj`` / ``down_proj``; NaN otherwise), the first-order effect without any downstream propagation.

The linear prediction is checked on a few modules (``validate``: the top and bottom by actdir): each is
ablated for real (g_m = 0) and the change of J measured; ``meta["linearisation"]`` has the pairs and
their Spearman correlation.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...adapter import LoraAdapter, adapter_fingerprint, load_adapter
from ...errors import InputError, SafepruneWarning, UsageError
from ...prompts import default_probes
from ..table import MethodInfo, ScoreTable, module_row

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


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# -- the score ----------------------------------------------------------------------------------------


DESCRIPTION = (
    "refusal-direction attribution: -dJ/dg_m, J = mean over harmful probes of "
    "sum_l <h_l[last], r_l/|r_l|>, r_l = mean harmful - mean harmless on the base "
    "(adapter off); high = the module moves activations away from refusal"
)


def _probe_prompts(harmful, harmless, info: dict[str, Any], data, n_probe: int, seed: int, harmless_source: str):
    """The given probes, or the default ones (recorded in ``info``) for whichever kind is missing."""
    if harmful is None or harmless is None:
        dh, dl, dinfo = default_probes(data, n_probe, seed, harmless_source)
        if harmful is None:
            harmful, info["harmful"] = dh, {"default": dinfo["harmful"], "data_dir": dinfo["data_dir"]}
        if harmless is None:
            harmless, info["harmless"] = dl, {"default": dinfo["harmless"], "data_dir": dinfo["data_dir"]}
    if len(harmful) < 2 or len(harmless) < 2:
        raise UsageError(f"need at least 2 harmful and 2 harmless probes (got {len(harmful)} and {len(harmless)})")
    return harmful, harmless


def _encode_probes(base: Path, harmful, harmless, max_length: int, chat_template: bool):
    """Token ids of both probe sets (strings go through the chat template; id lists are used as they are)
    and the tokenizer (None when every probe came as ids)."""
    tokenizer = None
    if any(isinstance(p, str) for p in list(harmful) + list(harmless)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load the tokenizer ({e})", base) from None
    enc = {}
    for name, ps in (("harmful", harmful), ("harmless", harmless)):
        if all(isinstance(p, str) for p in ps):
            enc[name] = encode(tokenizer, ps, max_length, chat_template)
        elif any(isinstance(p, str) for p in ps):
            raise UsageError(f"{name} probes: give all strings or all token-id lists")
        else:
            enc[name] = [list(map(int, p)) for p in ps]
    return enc, tokenizer


def _linearisation_check(att: Attribution, rows: list[dict[str, Any]], validate: int) -> dict[str, Any]:
    """Real ablations of the top and bottom modules by actdir against the linear prediction."""
    ranked = sorted(rows, key=lambda x: (-x["actdir"], x["module"]))
    k_top = (validate + 1) // 2
    chosen = ranked[:k_top] + [x for x in ranked[::-1][: validate - k_top] if x not in ranked[:k_top]]
    t3 = time.perf_counter()
    j_full = att.objective()
    pairs = []
    for x in chosen:
        with att.gated({x["module"]: 0.0}):
            actual = att.objective() - j_full
        rel = abs(x["actdir"] - actual) / abs(actual) if actual else float("nan")
        pairs.append({"module": x["module"], "predicted": x["actdir"], "actual": actual, "rel_error": rel})
    return {
        "modules": pairs,
        "J_full": j_full,
        "seconds": round(time.perf_counter() - t3, 3),
        "spearman": _spearman([p["predicted"] for p in pairs], [p["actual"] for p in pairs]),
    }


def score_actdir(
    base: str | Path,
    adapter: Any,
    *,
    harmful: Sequence[str] | Sequence[Sequence[int]] | None = None,
    harmless: Sequence[str] | Sequence[Sequence[int]] | None = None,
    n_probe: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 256,
    threads: int = 1,
    layers: Sequence[int] | None = None,
    validate: int = 10,
    data: str | Path | None = None,
    harmless_source: str = "mix",
    chat_template: bool = True,
    probe_info: dict[str, Any] | None = None,
) -> ScoreTable:
    """Score every LoRA module of ``adapter`` (a PEFT adapter directory or a :class:`LoraAdapter` loaded
    from one) on ``base`` (HF model directory) by refusal-direction attribution; see the module docstring.

    ``harmful`` / ``harmless``: prompts (strings, put in the chat template) or already tokenised prompts
    (lists of token ids, used as they are); None: :func:`default_probes` (``n_probe`` each, ``seed``).
    ``layers``: which h_l (1..L) enter J, default all with weight 1. ``validate``: how many modules (half
    top, half bottom by actdir) to ablate for real to check the linear prediction (0: none).
    """
    t0 = time.perf_counter()
    ad = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    if ad.path is None:
        raise UsageError("actdir loads the adapter with PEFT: give an adapter directory (this one has no path)")
    base = Path(base)
    if not base.is_dir():
        raise InputError("actdir needs the base model as a Hugging Face directory", base)
    if batch_size < 1 or max_length < 1 or threads < 1 or validate < 0:
        raise UsageError("batch_size, max_length and threads must be >= 1, validate >= 0")
    info: dict[str, Any] = dict(probe_info or {})
    harmful, harmless = _probe_prompts(harmful, harmless, info, data, n_probe, seed, harmless_source)

    with ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(threads)
        enc, tokenizer = _encode_probes(base, harmful, harmless, max_length, chat_template)
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        att = Attribution(
            base, ad, enc["harmful"], enc["harmless"], pad_id=pad_id, batch_size=batch_size, layers=layers
        )
        stack.callback(att.close)
        t1 = time.perf_counter()
        att.direction()
        dir_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        j1, score, direct = att.attribute()
        grad_s = time.perf_counter() - t2
        rows = [
            {
                **module_row(m),
                "actdir": score[m.name],
                "actdir_abs": abs(score[m.name]),
                "actdir_direct": direct[m.name],
            }
            for m in ad
        ]
        check = _linearisation_check(att, rows, validate) if validate else {}
        use, r_norm = att.layers, att.r_norm

    for r_ in rows:
        if not math.isfinite(r_["actdir"]):
            warnings.warn(f"{ad.path}: actdir of {r_['module']} is not finite", SafepruneWarning, stacklevel=2)
    options = {
        "n_harmful": len(enc["harmful"]),
        "n_harmless": len(enc["harmless"]),
        "seed": seed,
        "max_length": max_length,
        "batch_size": batch_size,
        "layers": use,
        "layer_weights": "uniform",
        "chat_template": bool(chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None)),
    }
    meta = {
        "adapter": str(ad.path),
        "adapter_sha256": adapter_fingerprint(ad.path),
        "base": str(base),
        "threads": threads,
        "device": "cpu",
        "probes": info,
        "J": j1,
        "direction_norms": [round(float(x), 6) for x in r_norm],
        "seconds": round(time.perf_counter() - t0, 3),
        "direction_seconds": round(dir_s, 3),
        "gradient_seconds": round(grad_s, 3),
        "linearisation": check,
        "modules": len(rows),
    }
    table = ScoreTable(
        rows=rows,
        methods={
            "actdir": MethodInfo(
                name="actdir",
                primary="actdir",
                descending=True,
                columns=["actdir", "actdir_abs", "actdir_direct"],
                options=options,
                description=DESCRIPTION,
            )
        },
        meta=meta,
    )
    table.add_ranks()
    return table


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
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
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

    def _acts(self, seqs: list[list[int]]):
        for ids, mask, last in _batches(seqs, self.batch_size, self.pad_id):
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
