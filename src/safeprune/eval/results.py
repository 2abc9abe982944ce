"""Writing and reading evaluation results: results.json, items.jsonl, summary.csv, summary.md."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.files import write_text_atomic

RESULTS = "results.json"
ITEMS = "items.jsonl"
STOPPED_MARK = " [stopped early: refusal keyword found]"


def shown_output(item: dict[str, Any]) -> str:
    """An item's output as a report shows it: marked when generation stopped early at a refusal keyword
    (the text is truncated there; the verdict is the one the full generation gets)."""
    return item["output"] + (STOPPED_MARK if item.get("stopped_early") else "")


def _clean(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    return o


def dumps(o: Any) -> str:
    return json.dumps(_clean(o), indent=1, ensure_ascii=False) + "\n"


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.{nd}f}"
    return str(v)


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for v, sets in results["metrics"].items():
        for s, m in sets.items():
            for k, val in m.items():
                rows.append({"variant": v, "set": s, "metric": k, "value": val})
    return rows


def summary_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["variant", "set", "metric", "value"], lineterminator="\n")
    w.writeheader()
    for r in summary_rows(results):
        w.writerow({**r, "value": "" if r["value"] is None else r["value"]})
    return buf.getvalue()


def summary_markdown(results: dict[str, Any]) -> str:
    kinds = {s["name"]: s["kind"] for s in results["sets"]}
    out = ["# safeprune eval", ""]
    out.append(
        f"Backend `{results['backend']['backend']}`, base `{results['backend']['base']}`; "
        f"refusal judges `{results['refusal_judge']['id']}` (ASR) and "
        f"`{(results.get('refusal_judge_broad') or {}).get('id', '—')}` (ASR broad), never averaged."
    )
    st = results["settings"]
    out.append(
        f"Greedy: {not st['do_sample']}; max_new_tokens safety {st['safety_max_new_tokens']}, utility "
        f"{st['utility_max_new_tokens']}, qa {st.get('qa_max_new_tokens', '—')}; batch {st['batch_size']}; system prompt: "
        f"{'template default' if st['system_prompt'] is None else repr(st['system_prompt'])}."
    )
    es = results.get("early_stop")
    if es:
        n_cut = sum(m.get("stopped_early", 0) for sm in results["metrics"].values() for m in sm.values())
        out.append(
            f"Early stopping at a refusal keyword: {es['why']}"
            + (
                f"; {n_cut} outputs truncated once their verdict was decided (`stopped_early` in items.jsonl)."
                if es["enabled"]
                else "."
            )
        )
    out.append("")
    hj = list(results.get("harm_judges", {}))
    for kind, title, cols in (
        (
            "safety",
            "Safety (harmful prompts)",
            [
                ("n_asr", "n", 0),
                ("asr", "ASR %", 1),
                ("asr_broad", "ASR % (broad)", 1),
                ("refusal_rate", "refused %", 1),
            ]
            + [(f"hs[{j}]", f"HS [{j}]", 2) for j in hj],
        ),
        (
            "over_refusal",
            "Over-refusal (benign prompts)",
            [("n", "n", 0), ("over_refusal", "refused %", 1), ("over_refusal_broad", "refused % (broad)", 1)],
        ),
        (
            "utility",
            "Utility",
            [
                ("n", "n", 0),
                ("rouge1", "ROUGE-1", 1),
                ("rouge2", "ROUGE-2", 1),
                ("rougeL", "ROUGE-L", 1),
                ("meteor", "METEOR", 1),
                ("bleu_corpus", "BLEU", 1),
                ("bleu", "sent-BLEU", 1),
                ("auarc", "AUARC", 1),
                ("auarc_rouge1", "AUARC(R1)", 1),
            ],
        ),
        (
            "qa",
            "Question answering",
            [
                ("n", "n", 0),
                ("em", "EM (SR) %", 1),
                ("f1", "F1", 1),
                ("auarc", "AUARC(EM)", 1),
                ("auarc_f1", "AUARC(F1)", 1),
            ],
        ),
    ):
        sets = [s for s, k in kinds.items() if k == kind]
        if not sets:
            continue
        cols = cols + [("tokens_per_s", "tok/s", 1), ("mean_latency_s", "latency s", 2)]
        out += [
            f"## {title}",
            "",
            "| variant | set | " + " | ".join(c[1] for c in cols) + " |",
            "|---|---|" + "---:|" * len(cols),
        ]
        for v, sm in results["metrics"].items():
            for s in sets:
                m = sm.get(s, {})
                out.append(f"| {v} | {s} | " + " | ".join(fmt(m.get(c[0]), c[2]) for c in cols) + " |")
        out.append("")
    met = results.get("meteor")
    if met and not met.get("available"):
        out += [f"METEOR unavailable: {met.get('how')}", ""]
    if "qa" in kinds.values():
        out += [
            "QA: EM (= SR, share answered exactly) and token F1 after SQuAD v1.1 normalisation, on the answer "
            "extracted from each generation (`answer` in items.jsonl).",
            "",
        ]
    if "utility" in kinds.values() and results.get("bleu"):
        out += [f"BLEU: sacrebleu corpus BLEU; sent-BLEU: mean sentence BLEU ({results['bleu']['signature']}).", ""]
    au = results.get("auarc") or {}
    if any(k in kinds.values() for k in ("utility", "qa")) and au.get("uncertainty_text"):
        line = f"AUARC uncertainty: {au['uncertainty_text']}"
        sm = au.get("sampling")
        if sm:
            eq = sm["equivalence"]
            line += (
                f"; {sm['samples']} samples per item (temperature {sm['temperature']}, top-p {sm['top_p']}, "
                f"seeds {sm['seeds']}), equivalence {eq['id'] if isinstance(eq, dict) else eq}"
            )
        out += [line + ".", ""]
    out.append(
        "Latency: wall time of the batch a prompt was generated in, or with continuous batching the time "
        "attributed to it (each step's time shared among the rows in it); adapters unmerged. tok/s: generated "
        "tokens over the summed generation time."
    )
    return "\n".join(out) + "\n"


def write_results(res, out_dir: str | Path) -> Path:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / ITEMS, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in res.items))
    write_text_atomic(d / "summary.csv", summary_csv(res.results))
    write_text_atomic(d / "summary.md", summary_markdown(res.results))
    write_text_atomic(d / RESULTS, dumps(res.results))  # last: its presence marks a complete result
    return d


def load_results(out_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    d = Path(out_dir)
    rp = d / RESULTS
    if not rp.is_file():
        raise InputError(f"no {RESULTS} here: not a safeprune eval output directory", d)
    try:
        results = json.loads(rp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"corrupt JSON ({e.msg})", rp) from None
    if results.get("schema") != "safeprune.eval/1":
        raise InputError(f"unknown results schema {results.get('schema')!r}", rp)
    ip = d / ITEMS
    if not ip.is_file():
        raise InputError(f"{ITEMS} missing", d)
    items = []
    with open(ip, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    raise InputError(f"line {i} is not valid JSON", ip) from None
    return results, items
