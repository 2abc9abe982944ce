"""Table cells of the study report: numbers with their confidence intervals, verdicts, the main τ."""

from __future__ import annotations

from typing import Any

from ...eval.results import fmt


def f1(x: Any, nd: int = 1) -> str:
    """A number with ``nd`` decimals (integers too); "—" for a missing or NaN value."""
    return fmt(float(x) if isinstance(x, int) and not isinstance(x, bool) else x, nd)


def ci(s: dict[str, Any] | None, nd: int = 1) -> str:
    if not s or s.get("value") is None:
        return "—"
    if "lo" not in s:
        return f1(s["value"], nd)
    return f"{f1(s['value'], nd)} [{f1(s['lo'], nd)}, {f1(s['hi'], nd)}]"


def dci(d: dict[str, Any] | None, nd: int = 1) -> str:
    if not d:
        return "—"
    v = f1(d["delta"], nd)
    v = v[1:] if v.startswith("-") and float(v) == 0 else v
    sign = "+" if float(v) > 0 else ""
    return f"{sign}{v} [{f1(d['lo'], nd)}, {f1(d['hi'], nd)}]"


def verdict_asr(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    if d["hi"] < 0:
        return "lower (CI excludes 0)"
    if d["lo"] > 0:
        return "higher (CI excludes 0)"
    return "no difference shown (CI includes 0)"


def main_tau(taus: list[int]) -> int | None:
    return 10 if 10 in taus else (taus[0] if taus else None)


def beats_chance(row: dict[str, Any], asr_k: str, r1_k: str | None, max_drop: float = 1.0) -> bool | None:
    """The selection criterion: ASR below the random mean at the same τ (95% CI excludes 0) while ROUGE-1
    loses at most ``max_drop`` points against the unedited adapter. None: no random control at that τ."""
    vx = row["vs_random"].get(asr_k)
    if not vx:
        return None
    ok_util = True
    if r1_k and r1_k in row["vs_ref"]:
        ok_util = row["vs_ref"][r1_k]["delta"] >= -max_drop
    return vx["hi"] < 0 and ok_util


def row_label(v: dict[str, Any], explicit: dict[str, set[int]]) -> str:
    """A variant's τ as the table shows it: the integer when the method asked for it, else its auto rule
    (an automatic τ differs between adapters, so it is matched by rule, not by value)."""
    if v["tau"] in explicit.get(v["method"], set()) or not v["auto"]:
        return str(v["tau"])
    return "/".join(v["auto"])


UTILITY_BUDGET = 1.0  # ROUGE-1 points a selection may lose against the unedited adapter and still meet the bar


def chance_verdict(row: dict[str, Any], asr_k: str, r1_k: str | None) -> str:
    """The one verdict of a selection against its random controls, used by the summary and every table (so
    "beats chance" means the same everywhere: ASR below chance *and* ROUGE-1 within the budget)."""
    vx = row["vs_random"].get(asr_k)
    if not vx:
        return "no random control at this τ"
    if vx["hi"] < 0:
        if beats_chance(row, asr_k, r1_k, UTILITY_BUDGET):
            return "beats chance"
        return f"ASR below chance, but ROUGE-1 loses more than {UTILITY_BUDGET:g} point — does not meet the bar"
    if vx["lo"] > 0:
        return "worse than chance"
    return "not distinguishable from chance"


def variant_label(v: dict[str, Any]) -> str:
    """A variant's one name in every table and figure of the report: "ddi τ=10", "random-s0 τ=10",
    "lora (LoRA)" (the results files key it as "lora:ddi@10"; the every-variant table shows both)."""
    if v.get("method") is None:
        return f"{v['adapter']} (LoRA)" if v.get("adapter") else "base (no adapter)"
    if v["method"] == "random":
        return f"random-s{v.get('seed')} τ={v['tau']}"
    if v.get("strength") is not None:  # safeprune repair, or one of its energy-matched controls
        return f"{v['method']}" + (f"-s{v['seed']}" if v.get("control_of") else "") + f" t={v['strength']:g}"
    return f"{v['method']} τ={v['tau']}" + (f" ({'/'.join(v['auto'])})" if v.get("auto") else "")
