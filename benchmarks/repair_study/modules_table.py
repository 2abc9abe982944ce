"""The module-level methods' trade-off table from a `safeprune run` report's analysis.json: per adapter, method
and τ, the ASR (unedited → edited; the random controls' mean at the same τ), the relative cut, edited − random
with its paired bootstrap 95% CI, the over-refusal and ROUGE-1 changes (the controls' own in brackets) and
issue 13's bar (cut ≥ 60% or within 10 points of the base, ROUGE-1 loss ≤ 1, over-refusal rise ≤ 5, below random
with a CI excluding 0).

usage: python benchmarks/repair_study/modules_table.py benchmarks/repair_study/modules/analysis.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safeprune.workflows.experiment.sections import repair_bar  # issue 13's bar, as the run report applies it

ASR, OR, R1 = "advbench/asr", "xstest/over_refusal", "dialogsum_test/rouge1"


def table(analysis: dict) -> str:
    base_asr = (
        analysis["base"]["metrics"][ASR]["value"] if "base" in analysis and "metrics" in analysis["base"] else None
    )
    out = [
        "| adapter | method | τ | ASR % unedited → edited (random mean) | relative cut | edited − random ASR [95% CI] "
        "| Δover-refusal (random's) | edited − random over-refusal [CI] | ΔROUGE-1 [CI] (random's) | issue 13's bar |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in analysis["adapters"].items():
        ref = next(r for r in a["rows"] if r["variant"]["method"] is None and r["variant"]["seed"] is None)
        u = ref["metrics"][ASR]["value"]
        rows = [r for r in a["rows"] if r["variant"]["method"] not in (None, "random") and r["variant"]["seed"] is None]
        for r in sorted(rows, key=lambda r: (r["variant"]["method"], r["variant"]["tau"])):
            v, tau = r["variant"], r["variant"]["tau"]
            rnd = a["random"].get(str(tau), {}).get("metrics", {})
            e = r["metrics"][ASR]["value"]
            cut = 100 * (u - e) / u if u else 0.0
            vr, vo, v1 = r["vs_random"][ASR], r["vs_random"][OR], r["vs_ref"][R1]
            d_or = r["vs_ref"][OR]["delta"]
            out.append(
                f"| {name} | {v['method']} | {tau} | {u:.0f} → {e:.0f} ({rnd[ASR]['value']:.1f}) | {cut:.0f}% | "
                f"{vr['delta']:+.1f} [{vr['lo']:+.1f}, {vr['hi']:+.1f}] | {d_or:+.0f} ({rnd[OR]['vs_ref']['delta']:+.1f}) | "
                f"{vo['delta']:+.1f} [{vo['lo']:+.1f}, {vo['hi']:+.1f}] | {v1['delta']:+.1f} [{v1['lo']:+.1f}, {v1['hi']:+.1f}] "
                f"({rnd[R1]['vs_ref']['delta']:+.1f}) | {repair_bar(r, u, base_asr, ASR, OR, R1)} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())), end="")
