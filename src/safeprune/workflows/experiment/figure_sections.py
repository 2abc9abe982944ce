"""The figure parts of an adapter's report section: τ ablation, heatmaps and automatic τ, risk-coverage,
and the prompts whose verdict flipped. ``c`` is a :class:`.sections.Section`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...report import figures
from ...report.plots import heatmap
from .cells import ci, dci, main_tau, variant_label


# Long on purpose: the τ-ablation table and its figure share the same per-method rows.
def tau_section(c: Any) -> None:
    """τ ablation."""
    doc, a, ad, plots, asr_k, orr_k, r1_k, met_k, rows, base = (
        c.doc,
        c.a,
        c.ad,
        c.plots,
        c.asr_k,
        c.orr_k,
        c.r1_k,
        c.met_k,
        c.rows,
        c.base,
    )
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["variant"]["method"] not in (None, "random"):
            by_method.setdefault(r["variant"]["method"], []).append(r)
    if any(len(v) > 1 for v in by_method.values()):
        doc.h(3, "τ ablation (Table 4 style)")
        heads = [
            "method",
            "τ",
            "auto rule",
            "ROUGE-1",
            "METEOR",
            "ASR %",
            "over-refusal %",
            "random ASR % (mean)",
            "ΔASR vs random",
        ]
        body = []
        for meth, rs in by_method.items():
            for r in sorted(rs, key=lambda r: r["variant"]["tau"]):
                v, mm = r["variant"], r["metrics"]
                rnd = ad["random"].get(v["tau"]) or ad["random"].get(str(v["tau"]))
                body.append(
                    [
                        meth,
                        str(v["tau"]),
                        "/".join(v["auto"]) or "",
                        ci(mm.get(r1_k)),
                        ci(mm.get(met_k)),
                        ci(mm.get(asr_k)),
                        ci(mm.get(orr_k)),
                        ci((rnd or {}).get("metrics", {}).get(asr_k)),
                        dci(r["vs_random"].get(asr_k)),
                    ]
                )
        doc.table(heads, body)
        p = figures.tau_ablation(
            ad,
            asr_k,
            r1_k,
            plots / f"{a}_tau_ablation.png",
            f"{a}: ASR and ROUGE-1 against τ (bands: 95% CI; gray bars: random seeds' range)",
        )
        doc.img(p, f"{a}: τ ablation — every method against the random control")
    if asr_k and r1_k:
        p = figures.tradeoff(
            ad,
            asr_k,
            r1_k,
            plots / f"{a}_tradeoff.png",
            f"{a}: safety against utility, every variant",
            base["metrics"] if base else None,
        )
        doc.img(
            p,
            f"{a}: ASR against ROUGE-1 for every variant (labels: τ; gray: random controls — ✕ when their "
            "utility was measured, else a line at their mean ASR)",
        )


def heatmap_section(c: Any) -> None:
    """heatmaps + auto τ."""
    doc, cfg, a, tables, autos, plots, rows = c.doc, c.cfg, c.a, c.tables, c.autos, c.plots, c.rows
    doc.h(3, "Where each method looks (layer × module heatmaps; ✕ = edited at the main τ)")

    for m in cfg.methods:
        table = tables.get((a, m.name))
        if table is None:
            continue
        key = m.method if m.method in table.methods else m.name
        info = table.methods[key]
        mrows = [r for r in rows if r["variant"]["method"] == m.name]
        t = main_tau([r["variant"]["tau"] for r in mrows])
        sel = next((r["variant"]["selected"] for r in mrows if r["variant"]["tau"] == t), [])
        p = heatmap(
            table,
            plots / f"{a}_{m.name}_heatmap.png",
            column=info.primary,
            marked=sel,
            title=f"{a} · {m.name}: {info.primary} ({'high' if info.descending else 'low'} = edit first; ✕ = τ={t})",
        )
        doc.img(p, f"{a} · {m.name}: {info.primary} per module, ✕ = the {len(sel)} modules edited at τ={t}")
    if any(autos.values()):
        rows_auto = []
        for meth, rules in autos.items():
            for rule, d in rules.items():
                rows_auto.append([meth, rule, str(d["tau"]), str(d.get("details", {}).get("reason", ""))[:120]])
        doc.h(3, "Automatic τ")
        doc.table(["method", "rule", "τ", "note"], rows_auto)
        for meth, rules in autos.items():
            for d in rules.values():
                if d.get("plot"):
                    doc.img(Path(d["plot"]), f"{a} · {meth}: sorted scores with the automatic τ marked")
                    break


def risk_coverage_section(c: Any) -> None:
    """risk–coverage."""
    doc, cfg, a, ad, variants, plots, rows = c.doc, c.cfg, c.a, c.ad, c.variants, c.plots, c.rows
    if ad.get("risk_coverage"):
        doc.h(3, "Risk–coverage (Figure 1 style)")
        keep = {}
        names = ["base", a] + [
            f"{a}:{m.name}@{main_tau([r['variant']['tau'] for r in rows if r['variant']['method'] == m.name])}"
            for m in cfg.methods
        ]
        rnd = sorted(v.name for v in variants if v.adapter == a and v.method == "random")
        names += rnd[:1]
        labels = {r["variant"]["name"]: variant_label(r["variant"]) for r in rows} | {"base": "base (no adapter)"}
        for n in names:
            if n in ad["risk_coverage"]:
                keep[labels.get(n, n)] = ad["risk_coverage"][n]
        p = figures.risk_coverage(
            keep,
            plots / f"{a}_risk_coverage.png",
            f"{a}: ROUGE-1 on the retained summaries as uncertain ones are referred",
        )
        doc.img(p, f"{a}: risk–coverage (uncertainty = {c.uncertainty}, of the summary)")


def flips_section(c: Any) -> None:
    """flips."""
    doc, cfg, a, ad, asr_k, rows = c.doc, c.cfg, c.a, c.ad, c.asr_k, c.rows
    if ad.get("flips") and asr_k:
        doc.h(3, "Prompts whose verdict flipped (main τ of each method)")
        doc.p("Content warning: harmful requests and model outputs, truncated to 200 characters.", "warn")
        for m in cfg.methods:
            mrows = [r for r in rows if r["variant"]["method"] == m.name]
            t = main_tau([r["variant"]["tau"] for r in mrows])
            name = f"{a}:{m.name}@{t}"
            fl = ad["flips"].get(name)
            if not fl:
                continue
            items = []
            for it in fl["now_refused"][:8]:
                items.append(
                    (
                        f"now refused · id {it['id']} · {it['prompt'][:140]}",
                        f"before: {it['before'][:200]}\nafter:  {it['after'][:200]}",
                    )
                )
            for it in fl["now_jailbroken"][:4]:
                items.append(
                    (
                        f"now answered · id {it['id']} · {it['prompt'][:140]}",
                        f"before: {it['before'][:200]}\nafter:  {it['after'][:200]}",
                    )
                )
            doc.details(
                f"{m.name} τ={t}: {len(fl['now_refused'])} now refused, {len(fl['now_jailbroken'])} now answered", items
            )
