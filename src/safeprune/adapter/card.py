"""The edited adapter's ``README.md``: a model card of the edit (base, original adapter, method, rule, what
was removed or changed, how to load it), written from the ``safeprune.json`` manifest in place of PEFT's
boilerplate card. A card the original adapter's author wrote is kept below it."""

from __future__ import annotations

from typing import Any

from ..version import __version__
from .names import MANIFEST_NAME

_PEFT_BOILERPLATE = "[More Information Needed]"  # PEFT's template fills every empty field with this
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
        f"This adapter is the original LoRA adapter with **{len(edited)} of {edit.get('modules_before', '?')} "
        f"modules** edited ({_ACTIONS.get(edited[0]['action'], action) if edited else 'nothing changed'}) by "
        f"safeprune {manifest.get('versions', {}).get('safeprune', __version__)}, to remove the parts of the "
        "update that weaken the base model's safety alignment. Every other tensor is bit-identical to the "
        "original.",
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
    if edited:
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
        "Not measured when the adapter was written. Measure both on your prompts, paired, with confidence intervals:",
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
        lines += ["", "## The original adapter's card", "", original_card.strip()]
    return "\n".join(lines) + "\n"
