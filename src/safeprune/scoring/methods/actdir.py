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
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch
from scipy.stats import spearmanr
from transformers import AutoTokenizer

from ...adapter import LoraAdapter, adapter_fingerprint, load_adapter
from ...errors import InputError, SafepruneWarning, UsageError
from ...io.progress import make_progress
from ...prompts import default_probes
from ...weights.resolve import resolve_model
from ..attribution import Attribution, encode
from ..table import MethodInfo, ScoreTable, module_row


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
            ref = resolve_model(str(base))
            tokenizer = AutoTokenizer.from_pretrained(ref.directory, **ref.kwargs())
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


# Long because of the record: the work is four helpers (probes, encoding, attribution, linearisation check);
# the rest is the options/meta dictionaries the score table carries.
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
    progress: bool = False,
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
    resolve_model(str(base))  # a model transformers can load (directory, .gguf, hub id), or a one-line error
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
        prog = stack.enter_context(make_progress(progress))  # batches counted as they start (bar, ETA)

        def phase(label: str, n_batches: int) -> None:
            task = prog.add_task(f"actdir: {label}", total=n_batches, module="")
            att.tick = lambda: prog.advance(task)

        n_h, n_l = att.batches(enc["harmful"]), att.batches(enc["harmless"])
        t1 = time.perf_counter()
        phase("refusal direction", n_h + n_l)
        att.direction()
        dir_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        phase("attribution (one backward pass)", n_h)
        j1, score, direct = att.attribute()
        grad_s = time.perf_counter() - t2
        if validate:
            phase(f"checking {min(validate, len(ad))} modules by ablation", n_h * (1 + min(validate, len(ad))))
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
