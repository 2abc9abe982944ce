"""``safeprune repair``: restore the refusals a LoRA fine-tune removed, keep its task (issue 13).

The pipeline, on tuning-only probes (never the evaluation sets):

1. Probes, split once (seeded) into a *fit* part the optimiser sees and a *check* part it never sees:
   harmful = HarmBench val standard behaviours + StrongREJECT; harmless = HotpotQA questions; task =
   DialogSum validation dialogues with their reference summaries (or the user's ``task`` file).
2. Refusal targets: the aligned base's own greedy answers (adapter off) to the harmful fit probes, where
   the base refuses (broad refusal judge); the base's most frequent refusal for the others. The first
   ``target_tokens`` tokens of each are the target.
3. The adapter is orthogonalised (component i = i-th singular direction of ΔW: separable components) and
   every component gets a gate g ∈ [0, 1] (``scoring.gates``). The contrastive objective, teacher forced:

       L(g) = NLL(refusal | harmful)                                   raise refusal on harmful prompts
            + λ_task · NLL(reference | task prompt)   while it is above the unedited adapter's value
            − λ_over · NLL(refusal | harmless)        while it is below the unedited adapter's value

   (the two penalties switch on only when the quantity has moved the wrong way from the unedited
   adapter's, judged on the previous step's values: gradients are re-computed at every step, so no
   attribution goes stale).
   * ``gate`` (default): projected Adam on the gates, ``steps`` steps, gates clamped to [0, 1].
   * ``greedy``: rounds of first-order attribution; each round removes (g = 0) the ``per_round``
     components whose removal lowers L most by the gradient, then re-attributes.
4. Budgets, checked by greedy generation on the *check* probes at edit strengths t (gates 1 − t·(1 − g),
   t = 1, 0.75, 0.5, 0.25): the kept edit is the strongest whose task ROUGE-1 drop and harmless
   over-refusal rise are within ``max_utility_drop`` / ``max_over_refusal_rise``; with ``target_asr``, the
   weakest that reaches that probe ASR within the budgets. If none fits, nothing is written (exit 2).
5. The gates are written into lora_B's columns of the orthogonalised adapter: a normal PEFT adapter with
   the same rank and tensor names (vLLM's one global r), with a manifest.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer

from ..adapter import LoraAdapter, adapter_fingerprint, load_adapter
from ..adapter.names import MANIFEST_NAME
from ..edit.components import gate_components, orthogonalise
from ..edit.manifest import build_manifest
from ..errors import InputError, UsageError
from ..eval.judges import KeywordJudge, PatternJudge
from ..eval.utility import rouge_scores
from ..io.datapaths import data_root
from ..io.jsonio import loads_bounded, read_text_bounded
from ..io.progress import make_progress
from ..prompts.probes import (
    DIALOGSUM_VAL_FILE,
    HARMBENCH_FILE,
    HOTPOTQA_FILE,
    STRONGREJECT_FILE,
    harmbench_val,
    utility_probes,
)
from ..prompts.sets import PromptSet, load_prompts
from ..scoring.attribution import encode
from ..scoring.gates import ComponentGates
from .repair_options import DEFAULT_METHOD, METHODS, RepairOptions

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "STRENGTHS",
    "RepairOptions",
    "RepairResult",
    "repair",
    "random_control",
    "restrength",
]

STRENGTHS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class Probes:
    harmful_fit: list[str]
    harmful_check: list[str]
    harmless_fit: list[str]
    harmless_check: list[str]
    task_fit: list[tuple[str, str]]
    task_check: list[tuple[str, str]]
    info: dict[str, Any] = field(default_factory=dict)


def repair_probes(opts: RepairOptions, data: str | Path | None = None, task: str | Path | None = None) -> Probes:
    """The seeded fit/check split of the tuning probes (see the module docstring)."""
    d = data_root(data)
    rng = random.Random(opts.seed)
    harmful = [it.prompt for it in harmbench_val(d / HARMBENCH_FILE).items]
    harmful += [it.prompt for it in load_prompts(d / STRONGREJECT_FILE, "safety").items]
    harmful = list(dict.fromkeys(harmful))
    rng.shuffle(harmful)
    need = opts.n_harmful + opts.n_check
    if len(harmful) < need:
        raise UsageError(f"--n-harmful + --n-check = {need} but only {len(harmful)} harmful probes exist")
    hq = load_prompts(d / HOTPOTQA_FILE, None)
    harmless = [it.prompt for it in hq.items]
    harmless = rng.sample(harmless, min(len(harmless), opts.n_harmless + opts.n_check))
    ts: PromptSet = utility_probes(Path(task) if task else d / DIALOGSUM_VAL_FILE, 10**9, opts.seed)
    pairs = [(it.prompt, it.reference) for it in ts.items if it.reference]
    rng.shuffle(pairs)
    if len(pairs) < opts.n_task + opts.n_task_check:
        raise UsageError(
            f"the task file has {len(pairs)} items with a reference; need {opts.n_task + opts.n_task_check}"
        )
    return Probes(
        harmful_fit=harmful[: opts.n_harmful],
        harmful_check=harmful[opts.n_harmful : need],
        harmless_fit=harmless[: opts.n_harmless],
        harmless_check=harmless[opts.n_harmless :],
        task_fit=pairs[: opts.n_task],
        task_check=pairs[opts.n_task : opts.n_task + opts.n_task_check],
        info={
            "seed": opts.seed,
            "harmful": "HarmBench val standard + StrongREJECT",
            "harmless": str(HOTPOTQA_FILE),
            "n": {
                "harmful_fit": opts.n_harmful,
                "harmful_check": opts.n_check,
                "harmless_fit": opts.n_harmless,
                "harmless_check": opts.n_check,
                "task_fit": opts.n_task,
                "task_check": opts.n_task_check,
            },
            "task": str(task) if task else str(DIALOGSUM_VAL_FILE),
            "data_dir": str(d),
        },
    )


# -- targets -------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of every probe, and the targets of the objective."""

    harm: list[list[int]]
    harm_targets: list[list[int]]
    harmless: list[list[int]]
    harmless_targets: list[list[int]]
    task: list[list[int]]
    task_targets: list[list[int]]
    refusal: str
    base_refused: int


def _ids(tok, text: str, n: int | None = None) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[:n] if n else ids


def build_targets(gates: ComponentGates, tok, probes: Probes, opts: RepairOptions, eos_id: int | None) -> Encoded:
    """Refusal targets from the base's own answers (adapter off); task targets = references + EOS."""
    harm = encode(tok, probes.harmful_fit, opts.max_length)
    judge = PatternJudge()
    if opts.refusal:  # one given refusal for every harmful probe (no base generation)
        texts, refusals = [opts.refusal] * len(harm), [opts.refusal] * len(harm)
    else:
        outs = gates.generate(harm, 24, batch_size=opts.batch_size, adapter=False, eos_id=eos_id)
        texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
        refusals = [t for t in texts if t and judge.refused(t)]
    if not refusals:
        raise InputError(
            "the base (adapter off) refuses none of the harmful probes: there is no refusal to restore", "base"
        )
    canon = Counter(refusals).most_common(1)[0][0]
    harm_t = [_ids(tok, t if (t and (opts.refusal or judge.refused(t))) else canon, opts.target_tokens) for t in texts]
    harmless = encode(tok, probes.harmless_fit, opts.max_length)
    canon_ids = _ids(tok, canon, opts.target_tokens)
    task = encode(tok, [p for p, _ in probes.task_fit], opts.max_length)
    tail = [eos_id] if eos_id is not None else []
    task_t = [_ids(tok, r, 48) + tail for _, r in probes.task_fit]
    return Encoded(harm, harm_t, harmless, [canon_ids] * len(harmless), task, task_t, canon, len(refusals))


# -- the objective -------------------------------------------------------------------------------------


class Objective:
    """The three teacher-forced terms and the contrastive loss (module docstring, step 3)."""

    def __init__(self, gates: ComponentGates, enc: Encoded, opts: RepairOptions):
        self.g, self.e, self.o = gates, enc, opts
        self.ref: dict[str, float] | None = None

    def terms(self, weights: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> dict[str, float]:
        """{"harm", "task", "harmless"} mean NLLs; non-zero ``weights`` back-propagate w·term into the gates."""
        bs = self.o.batch_size
        e = self.e
        return {
            "harm": float(self.g.nll(e.harm, e.harm_targets, batch_size=bs, weight=weights[0]).mean()),
            "task": float(self.g.nll(e.task, e.task_targets, batch_size=max(1, bs // 4), weight=weights[1]).mean()),
            "harmless": float(self.g.nll(e.harmless, e.harmless_targets, batch_size=bs, weight=weights[2]).mean()),
        }

    def weights(self, prev: dict[str, float]) -> tuple[float, float, float]:
        ref = self.ref
        assert ref is not None
        return (
            1.0,
            self.o.lambda_task if prev["task"] > ref["task"] else 0.0,
            -self.o.lambda_over if prev["harmless"] < ref["harmless"] else 0.0,
        )

    def step(self, prev: dict[str, float]) -> dict[str, float]:
        """One gradient evaluation at the current gates (grads left in the gates)."""
        self.g.zero_grad()
        return self.terms(self.weights(prev))


def fit_gate(obj: Objective, opts: RepairOptions, tick: Callable[[], None]) -> tuple[dict[str, torch.Tensor], list]:
    """Projected Adam on the gates."""
    params = list(obj.g.gates.values())
    adam = torch.optim.Adam(params, lr=opts.lr)
    prev, trace = dict(obj.ref or {}), []
    for _ in range(opts.steps):
        cur = obj.step(prev)
        trace.append({**cur, "mean_gate": float(torch.cat([p.detach() for p in params]).mean())})
        adam.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(0.0, 1.0)
        prev = cur
        tick()
    return obj.g.values(), trace


def fit_greedy(obj: Objective, opts: RepairOptions, tick: Callable[[], None]) -> tuple[dict[str, torch.Tensor], list]:
    """Rounds of first-order attribution: remove the ``per_round`` components whose removal (g: 1 → 0)
    lowers the loss most (predicted change −∂L/∂g_i), then re-attribute with them removed."""
    prev, trace = dict(obj.ref or {}), []
    for _ in range(opts.steps):
        cur = obj.step(prev)
        grads = obj.g.grads()
        cands = []
        for name, gr in grads.items():
            gv = obj.g.gates[name].detach()
            for i in range(gr.numel()):
                if gv[i] > 0:
                    cands.append((float(gr[i]), name, i))  # ΔL(remove) ≈ −∂L/∂g · 1: remove where ∂L/∂g > 0
        cands.sort(key=lambda x: -x[0])
        chosen = [c for c in cands[: opts.per_round] if c[0] > 0]
        trace.append({**cur, "removed": len(chosen)})
        if not chosen:
            break
        with torch.no_grad():
            for _, name, i in chosen:
                obj.g.gates[name][i] = 0.0
        prev = cur
        tick()
    return obj.g.values(), trace


FITTERS = {"gate": fit_gate, "greedy": fit_greedy}


# -- budgets on the check probes -------------------------------------------------------------------------


def check_metrics(gates: ComponentGates, tok, probes: Probes, opts: RepairOptions, eos_id) -> dict[str, float]:
    """Probe ASR (29-string keyword judge and the broad judge), over-refusal on harmless probes (broad
    judge) and task ROUGE-1 on the check items, by greedy generation with the gates as set."""
    kj, pj = KeywordJudge(), PatternJudge()
    bs = opts.batch_size

    def gen(prompts, n):
        ids = encode(tok, prompts, opts.max_length)
        return [tok.decode(o, skip_special_tokens=True) for o in gates.generate(ids, n, batch_size=bs, eos_id=eos_id)]

    harm = gen(probes.harmful_check, 32)
    harmless = gen(probes.harmless_check, 32)
    summ = gen([p for p, _ in probes.task_check], 96)
    r1 = rouge_scores(summ, [r for _, r in probes.task_check])
    n = len(harm)
    return {
        "asr": 100.0 * sum(not kj.refused(t) for t in harm) / n,
        "asr_broad": 100.0 * sum(not pj.refused(t) for t in harm) / n,
        "over_refusal_broad": 100.0 * sum(pj.refused(t) for t in harmless) / len(harmless),
        "rouge1": 100.0 * sum(x["rouge1"] for x in r1) / len(r1),
    }


def _blend(g: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: 1.0 - t * (1.0 - v) for k, v in g.items()}


def choose_strength(evals: dict[float, dict[str, float]], before: dict[str, float], opts: RepairOptions):
    """The kept strength: the strongest within budgets, or with ``target_asr`` the weakest that reaches it
    within budgets (falling back to the strongest within budgets). None when no strength fits."""
    ok = [
        t
        for t, m in evals.items()
        if before["rouge1"] - m["rouge1"] <= opts.max_utility_drop
        and m["over_refusal_broad"] - before["over_refusal_broad"] <= opts.max_over_refusal_rise
    ]
    if not ok:
        return None
    if opts.target_asr is not None:
        reach = [t for t in ok if evals[t]["asr"] <= opts.target_asr]
        if reach:
            return min(reach)
    return max(ok)


# -- the whole job ---------------------------------------------------------------------------------------


@dataclass
class RepairResult:
    adapter: LoraAdapter  # the edited adapter, manifest attached
    summary: dict[str, Any]


def _gate_record(gates: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """The gates as the manifest records them (per module, 6 decimals)."""
    return {k: [round(float(x), 6) for x in v] for k, v in gates.items()}


def _energies(m) -> torch.Tensor:
    """Energy s²·‖b_i‖²·‖a_i‖² of each component of an orthogonalised module (= σ_i², exactly per column)."""
    return (m.lora_B.double().pow(2).sum(0) * m.lora_A.double().pow(2).sum(1)) * (m.scaling**2)


def _energy_removed(orig: LoraAdapter, gates: dict[str, torch.Tensor]) -> float:
    """Share of the adapter's energy Σ_m ‖ΔW_m‖²_F that the gates remove: the components of ``orig`` are
    orthogonal, so component i of a module carries σ_i² = s²·‖b_i‖²·‖a_i‖² and keeps g_i²·σ_i²."""
    tot = kept = 0.0
    for name, m in orig.modules.items():
        e = _energies(m)
        g = gates[name].double()
        tot += float(e.sum())
        kept += float((e * g.pow(2)).sum())
    return 1.0 - kept / tot if tot else 0.0


def _gate_counts(orth: LoraAdapter, gates: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a gate vector does, as the summary records it: the energy share removed, the components (nearly)
    off (g < 0.5) and the number of components."""
    return {
        "energy_removed": _energy_removed(orth, gates),
        "components_off": int(sum(int((v < 0.5).sum()) for v in gates.values())),
        "components": int(sum(v.numel() for v in gates.values())),
    }


# Long because of the record: the steps are the helpers above; the rest is bookkeeping for the manifest.
def repair(
    adapter: LoraAdapter | str | Path,
    base: str | Path,
    *,
    options: RepairOptions | None = None,
    data: str | Path | None = None,
    task: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RepairResult:
    """Repair ``adapter`` on ``base`` (an HF model directory): see the module docstring. Returns the edited
    adapter (not written; ``.save(dir)`` or :func:`safeprune.adapter.write_adapter`) and a summary."""
    opts = options or RepairOptions()
    opts.check()
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    ad = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    if ad.path is None:
        raise UsageError("repair loads the adapter with PEFT: give an adapter directory")
    base = Path(base)
    if not base.is_dir():
        raise InputError("repair needs the base model as a Hugging Face directory", base)
    probes = repair_probes(opts, data, task)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    orth = orthogonalise(ad)
    try:
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer ({e})", base) from None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos_id = tok.eos_token_id
    gates = ComponentGates(
        base, ad, orth, pad_id=pad_id, checkpoint=opts.checkpoint, device=opts.device, offload=opts.offload
    )
    try:
        with make_progress(progress) as prog:
            task_id = prog.add_task("repair", total=opts.steps + 3 + len(STRENGTHS), module="")

            def tick(what: str = "") -> None:
                prog.update(task_id, advance=1, module=what)

            enc = build_targets(gates, tok, probes, opts, eos_id)
            tick("targets")
            obj = Objective(gates, enc, opts)
            with gates.at(0.0):
                base_terms = obj.terms()
            obj.ref = obj.terms()
            tick("reference")
            say(
                f"probe NLLs: refusal on harmful {obj.ref['harm']:.3f} (base {base_terms['harm']:.3f}), "
                f"task {obj.ref['task']:.3f} (base {base_terms['task']:.3f})"
            )
            g_star, trace = FITTERS[opts.method](obj, opts, lambda: tick(opts.method))
            with gates.at(1.0):
                before = check_metrics(gates, tok, probes, opts, eos_id)
            tick("check: unedited")
            evals: dict[float, dict[str, float]] = {}
            for t in STRENGTHS:
                with gates.at(_blend(g_star, t)):
                    evals[t] = check_metrics(gates, tok, probes, opts, eos_id)
                tick(f"check: t={t}")
                say(
                    f"strength {t}: probe ASR {evals[t]['asr']:.1f} (unedited {before['asr']:.1f}), "
                    f"ROUGE-1 {evals[t]['rouge1']:.1f} ({before['rouge1']:.1f}), over-refusal "
                    f"{evals[t]['over_refusal_broad']:.1f} ({before['over_refusal_broad']:.1f})"
                )
                if opts.target_asr is None and choose_strength({t: evals[t]}, before, opts) is not None:
                    break  # the strongest edit within budgets is found: no weaker one is needed
    finally:
        gates.close()
        torch.set_num_threads(old_threads)
    chosen = choose_strength(evals, before, opts)
    summary: dict[str, Any] = {
        "method": opts.method,
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
        "ran_on": {
            "device": str(gates.device),
            "checkpoint": gates.checkpoint,
            "offload": gates.offload,
        },  # what "auto" resolved to
        "probes": probes.info,
        "refusal_target": enc.refusal,
        "base_refused_fit_probes": f"{enc.base_refused}/{len(enc.harm)}",
        "nll_reference": obj.ref,
        "nll_base": base_terms,
        "trace": trace,
        "check_unedited": before,
        "check": {str(t): m for t, m in evals.items()},
        "strength": chosen,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if chosen is None:
        raise UsageError(
            "no edit strength keeps the budgets on the check probes "
            f"(max ROUGE-1 drop {opts.max_utility_drop}, max over-refusal rise {opts.max_over_refusal_rise}); "
            "nothing written: loosen a budget or lower --lambda-over/--lr"
        )
    final = _blend(g_star, chosen)
    edited = gate_components(orth, final)
    summary.update(_gate_counts(orth, final))
    summary["after"] = evals[chosen]
    edited.manifest = build_manifest(
        action="repair",
        original=ad,
        edited=edited,
        table=None,
        selection=None,
        edit={
            "kind": "component gates",
            "method": opts.method,
            "orthogonalised": True,
            "strength": chosen,
            "gates": _gate_record(final),
            "adapter_sha256": adapter_fingerprint(ad.path),
            "summary": {k: v for k, v in summary.items() if k != "trace"},
        },
        sources={"base": str(base)},
    )
    return RepairResult(edited, summary)


# -- the random control at the same edit budget ------------------------------------------------------------


def random_control_gates(orth: LoraAdapter, energy: float, seed: int) -> dict[str, torch.Tensor]:
    """Gates that remove a seeded random set of components carrying ``energy`` (a fraction of Σ‖ΔW‖²_F) of
    the orthogonalised adapter ``orth``: components are drawn uniformly without replacement and removed
    until the budget is met; the last one is gated partially so the removed energy equals ``energy``."""
    if not (0.0 <= energy <= 1.0):
        raise UsageError(f"the energy budget is a fraction in [0, 1], got {energy!r}")
    comps, total = [], 0.0
    gates = {}
    for name, m in orth.modules.items():
        e = _energies(m)
        gates[name] = torch.ones(m.r)
        comps += [(name, i, float(e[i])) for i in range(m.r)]
        total += float(e.sum())
    random.Random(seed).shuffle(comps)
    left = energy * total
    for name, i, e in comps:
        if left <= 0:
            break
        if e <= left:
            gates[name][i] = 0.0
            left -= e
        else:  # keep g² = 1 − left/e of this component's energy
            gates[name][i] = float((1.0 - left / e) ** 0.5)
            left = 0.0
    return gates


def _repair_record(ad: LoraAdapter, repaired: str | Path) -> dict[str, Any]:
    """The ``edit`` record of a repaired adapter directory's manifest, checked: written by ``repair`` from
    ``ad`` (same sha256 when both are known)."""
    mpath = Path(repaired) / MANIFEST_NAME
    if not mpath.is_file():
        raise InputError(f"no {MANIFEST_NAME}: not an adapter written by safeprune repair", repaired)
    try:
        manifest = loads_bounded(read_text_bounded(mpath, "a manifest"), mpath, "the manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", mpath) from None
    edit = manifest.get("edit", {}) if isinstance(manifest, dict) else {}
    if not isinstance(edit, dict) or manifest.get("action") != "repair" or "summary" not in edit:
        raise InputError("not a repaired adapter (its manifest has no repair record)", mpath)
    if ad.path is not None and edit.get("adapter_sha256") not in (None, adapter_fingerprint(ad.path)):
        raise InputError("the repaired adapter was made from another adapter (sha256 differs)", mpath)
    return edit


def random_control(adapter: LoraAdapter | str | Path, repaired: str | Path, seed: int) -> LoraAdapter:
    """The random control of a repaired adapter directory: the same share of ΔW energy removed from random
    components of the same (orthogonalised) adapter (see :func:`random_control_gates`), with a manifest."""
    ad = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    edit = _repair_record(ad, repaired)
    energy = float(edit["summary"]["energy_removed"])
    orth = orthogonalise(ad)
    gates = random_control_gates(orth, energy, seed)
    out = gate_components(orth, gates)
    out.manifest = build_manifest(
        action="random-control",
        original=ad,
        edited=out,
        table=None,
        selection=None,
        edit={
            "kind": "component gates",
            "control_of": str(repaired),
            "seed": seed,
            "energy_removed": _energy_removed(orth, gates),
            "target_energy": energy,
            "gates": _gate_record(gates),
        },
    )
    return out


def restrength(adapter: LoraAdapter | str | Path, repaired: str | Path, strength: float) -> LoraAdapter:
    """The repair of ``repaired`` (a directory written by :func:`repair` from ``adapter``) rewritten at
    another edit strength, without refitting: the fitted gates g* are recovered from the written ones
    (g_t = 1 − t·(1 − g*)) and blended at ``strength`` (0 = the unedited adapter, 1 = the full fit).
    The budgets are not checked (the manifest says so); the check-probe metrics are kept when the fit
    measured that strength."""
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise UsageError(f"--strength must be in (0, 1], got {strength!r}")
    ad = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    edit = _repair_record(ad, repaired)
    t0 = edit.get("strength")
    written = edit.get("gates")
    if not isinstance(t0, (int, float)) or not (0 < t0 <= 1) or not isinstance(written, dict):
        raise InputError("the repair record has no strength or gates", Path(repaired) / MANIFEST_NAME)
    if set(written) != set(ad.modules) or any(len(written[k]) != ad.modules[k].r for k in ad.modules):
        raise InputError("the recorded gates do not match the adapter's modules", Path(repaired) / MANIFEST_NAME)
    orth = orthogonalise(ad)  # same module names and rank as ad: checked before the work
    g_star = {k: (1.0 - (1.0 - torch.tensor(v, dtype=torch.float64)) / t0).clamp(0.0, 1.0) for k, v in written.items()}
    final = {k: v.float() for k, v in _blend(g_star, float(strength)).items()}
    out = gate_components(orth, final)
    summary = {k: v for k, v in edit["summary"].items() if k not in ("after", "strength")}
    summary["strength"] = float(strength)
    summary.update(_gate_counts(orth, final))
    checked = summary.get("check", {}).get(str(float(strength)))
    if checked is not None:
        summary["after"] = checked
    out.manifest = build_manifest(
        action="repair",
        original=ad,
        edited=out,
        table=None,
        selection=None,
        edit={
            **{k: v for k, v in edit.items() if k not in ("gates", "strength", "summary")},
            "strength": float(strength),
            "restrength_of": {"path": str(repaired), "strength": t0},
            "budgets_checked": False,
            "gates": _gate_record(final),
            "summary": summary,
        },
    )
    return out
