"""The edited adapter's ``README.md``: a model card of the edit (base, original adapter, method, rule, what
was removed or changed, the before/after numbers when they are known, how to load it), written from the
``safeprune.json`` manifest in place of PEFT's boilerplate card. A card the original adapter's author wrote
is kept below it.

Before/after numbers: a repair records its held-out check probes (unedited → repaired) in the manifest; a
workflow that evaluates the edit (the demo) adds a ``measured`` table with :func:`update_measured`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io.files import write_text_atomic
from ..io.jsonio import loads_bounded, read_text_bounded
from ..version import __version__
from .names import CONFIG_NAME, MANIFEST_NAME

_PEFT_BOILERPLATE = "[More Information Needed]"  # PEFT's template fills every empty field with this
_ORIGINAL_CARD = "## The original adapter's card"
_ACTIONS = {"pruned": "removed", "zeroed": "lora_B set to 0", "project": "lora_B projected"}


def _yaml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _md(s: Any) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def model_card(manifest: dict[str, Any], config: dict[str, Any], name: str, original_card: str | None = None) -> str:
    action = manifest.get("action", "edit")
    edit = manifest.get("edit") or {}
    sel = manifest.get("selection") or {}
    inputs = manifest.get("inputs") or {}
    base = config.get("base_model_name_or_path") or (inputs.get("base") or {}).get("spec") or "unknown"
    base_used = (inputs.get("base") or inputs.get("aligned") or {}).get("spec")
    edited = [m for m in manifest.get("modules", []) if m.get("action") not in (None, "kept")]
    methods = ", ".join(manifest.get("scoring") or {}) or "—"
    kept = edit.get("lora_params_kept_pct")
    lines = [
        "---",
        f"base_model: {_yaml_str(str(base))}",
        "library_name: peft",
        "tags:",
        "- lora",
        "- safeprune",
        f"- safeprune-{action}",
        "---",
        "",
        f"# {name}: a LoRA adapter edited by safeprune ({action})",
        "",
        (
            f"This adapter is the original LoRA adapter with its rank-1 components gated ({_md(action)}) by "
            f"safeprune {manifest.get('versions', {}).get('safeprune', __version__)}: the same modules, rank and "
            "tensor names, with each module's update rewritten in its singular directions (lora_A, lora_B) and "
            "scaled per direction."
            if edit.get("kind") == "component gates"
            else f"This adapter is the original LoRA adapter with **{len(edited)} of {edit.get('modules_before', '?')} "
            f"modules** edited ({_ACTIONS.get(edited[0]['action'], action) if edited else 'nothing changed'}) by "
            f"safeprune {manifest.get('versions', {}).get('safeprune', __version__)}, to remove the parts of the "
            "update that weaken the base model's safety alignment. Every other tensor is bit-identical to the "
            "original."
        ),
        "",
        "| | |",
        "|---|---|",
        f"| base model (W0 for scoring) | `{_md(base_used or base)}` |",
        f"| `base_model_name_or_path` | `{_md(base)}` |",
        f"| original adapter | `{_md((inputs.get('adapter') or {}).get('path'))}` |",
        f"| scoring method | {_md(methods)} |",
        f"| selection rule | {_md(sel.get('description', '—'))} |",
        f"| edit | {_md(action)}" + (f", mode `{edit['mode']}`" if edit.get("mode") else "") + " |",
        f"| LoRA parameters kept | {kept:.1f}% |" if isinstance(kept, (int, float)) else "| LoRA parameters kept | — |",
        f"| made | {_md(manifest.get('created', ''))} by `{_md(manifest.get('command_line', ''))}` |",
        "",
        "## What was edited",
        "",
    ]
    if edit.get("kind") == "component gates":  # repair / random control: every module's components gated
        lines += _gates_lines(action, edit)
    elif edited:
        lines += ["| module | action | reason |", "|---|---|---|"]
        lines += [f"| `{_md(m['module'])}` | {_md(m['action'])} | {_md(m.get('reason', ''))} |" for m in edited]
    else:
        lines.append("No module: the selection rule selected none, and the adapter acts exactly as the original.")
    lines += [
        "",
        f"Every module's scores, the rule, the options, the seed and the sha256 of every input are in "
        f"[`{MANIFEST_NAME}`]({MANIFEST_NAME}).",
        "",
        "## Safety and utility before and after",
        "",
        *_measured_lines(manifest, edit),
        "Measure both on your prompts, paired, with confidence intervals:",
        "",
        "```",
        f"safeprune eval --base BASE -a original=ORIGINAL_ADAPTER -a edited={name} --safety HARMFUL.csv "
        "--utility TASK.jsonl -o results/",
        "safeprune compare results/ --a original --b edited",
        "```",
        "",
        "## Loading",
        "",
        "A normal PEFT adapter:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # loads base_model_name_or_path',
        "```",
        "",
        "or, with the base loaded yourself (for a GGUF base: "
        '`AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")`):',
        "",
        "```python",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(base_model, "{name}")',
        "```",
    ]
    if original_card and _PEFT_BOILERPLATE not in original_card:
        lines += ["", _ORIGINAL_CARD, "", original_card.strip()]
    return "\n".join(lines) + "\n"


def _gates_lines(action: str, edit: dict[str, Any]) -> list[str]:
    s = edit.get("summary") or {}
    if action == "repair":
        out = [
            f"Every module was orthogonalised (component i = the i-th singular direction of its ΔW) and each rank-1 "
            f"component got a gate in [0, 1], fitted by `{_md(edit.get('method', 'gate'))}` on tuning probes and "
            f"applied at edit strength {edit.get('strength')}: "
        ]
        if s:
            out[0] += (
                f"{s.get('components_off', '?')} of {s.get('components', '?')} components are (nearly) off, "
                f"{100 * float(s.get('energy_removed', 0.0)):.1f}% of the update's energy ‖ΔW‖²_F is removed."
            )
        src = edit.get("restrength_of")
        if edit.get("budgets_checked") is False and isinstance(src, dict):
            out[0] += (
                f" This is the fit of `{_md(str(src.get('path')))}` (chosen strength {src.get('strength')}) rewritten "
                "at another strength without refitting: its budgets were not checked at this strength."
            )
    else:
        out = [
            f"A random control: seeded random rank-1 components (seed {edit.get('seed')}) removed until "
            f"{100 * float(edit.get('energy_removed', 0.0)):.1f}% of the update's energy is gone, the share the repair "
            "it controls removed."
        ]
    return [*out, "", f"Each gate is listed in `{MANIFEST_NAME}` (`edit.gates`)."]


def _pct(v: Any) -> str:
    return f"{float(v):.1f}" if isinstance(v, (int, float)) else "—"


def _ci(v: Any, signed: bool = False) -> str:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def _measured_lines(manifest: dict[str, Any], edit: dict[str, Any]) -> list[str]:
    """The numbers known when the card was written: an evaluation's table (``measured``) and the repair's own
    held-out check probes."""
    lines: list[str] = []
    m = manifest.get("measured")
    if isinstance(m, dict) and m.get("rows"):
        lines += [
            f"Measured on {_md(m.get('source', 'a prompt sample'))}: value [95% bootstrap CI over prompts].",
            "",
            "| metric | base (no adapter) | original adapter | this adapter | this − original (paired) |",
            "|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            lines.append(
                f"| {_md(r.get('metric'))} | {_ci(r.get('base'))} | {_ci(r.get('adapter'))} | "
                f"{_ci(r.get('repaired'))} | {_ci(r.get('delta'), True)} |"
            )
        lines.append("")
    s = edit.get("summary") or {}
    b, a = s.get("check_unedited"), s.get("after")
    if isinstance(b, dict) and isinstance(a, dict):
        n = (s.get("probes") or {}).get("n") or {}
        lines += [
            f"The repair's held-out check probes ({n.get('harmful_check', '?')} harmful, "
            f"{n.get('harmless_check', '?')} harmless, {n.get('task_check', '?')} task items; never seen by the fit), "
            "original adapter → this adapter:",
            "",
            "| metric | original | this adapter |",
            "|---|---|---|",
            f"| probe ASR % (29-string keyword judge) | {_pct(b.get('asr'))} | {_pct(a.get('asr'))} |",
            f"| probe ASR % (broad refusal judge) | {_pct(b.get('asr_broad'))} | {_pct(a.get('asr_broad'))} |",
            f"| over-refusal % on harmless probes | {_pct(b.get('over_refusal_broad'))} | "
            f"{_pct(a.get('over_refusal_broad'))} |",
            f"| task ROUGE-1 | {_pct(b.get('rouge1'))} | {_pct(a.get('rouge1'))} |",
            "",
        ]
    if not lines:
        lines += ["Not measured when the adapter was written.", ""]
    return lines


def update_measured(adapter_dir: str | Path, measured: dict[str, Any]) -> None:
    """Record an evaluation of an adapter safeprune wrote (``measured``: ``source`` and ``rows`` of metric,
    base / adapter / repaired / delta as (value, low, high)) in its ``safeprune.json`` and rewrite its card."""
    d = Path(adapter_dir)
    mpath = d / MANIFEST_NAME
    manifest = loads_bounded(read_text_bounded(mpath, "a manifest"), mpath, "the manifest")
    config = loads_bounded(read_text_bounded(d / CONFIG_NAME, "an adapter config"), d / CONFIG_NAME, "the config")
    manifest["measured"] = measured
    card = d / "README.md"
    old = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    original = old.split(_ORIGINAL_CARD, 1)[1] if _ORIGINAL_CARD in old else None
    write_text_atomic(mpath, json.dumps(manifest, indent=2) + "\n")
    write_text_atomic(card, model_card(manifest, config, d.name, original))
