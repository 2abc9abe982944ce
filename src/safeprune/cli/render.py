"""What the commands print and write beside their main output: the score table on the terminal, the
method-agreement table, and the --json/--csv/--plot side files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rich.table import Table

from ..errors import UsageError
from ..io.commit import Outputs
from ..io.text import fmt_number, natural_key, one_line
from .app import err, out, report, state

if TYPE_CHECKING:  # the model libraries load when a command runs, not when its help is shown
    from ..scoring import ScoreTable


def print_table(
    table: ScoreTable, sort: str = "rank", limit: Optional[int] = None, marked: set[str] | None = None
) -> None:
    if state["quiet"]:
        return
    first = next(iter(table.methods.values()))
    if sort == "rank":
        rows = table.ordered(first.primary, first.descending)
    else:  # module order: layer 2 before layer 10
        rows = sorted(table.rows, key=lambda r: natural_key(r["module"]))
    if limit:
        rows = rows[:limit]
    t = Table(show_lines=False, header_style="bold", title=f"{len(table)} LoRA modules", title_justify="left")
    cols = ["module"] + [c for c in table.score_columns if c not in ("t", "delta_fro", "base_fro")]
    if len(table.methods) > 1:  # several methods: their primary scores side by side (all columns: --json/--csv)
        cols = ["module"] + list(dict.fromkeys(i.primary for i in table.methods.values()))
    cols += [f"rank_{m}" for m in table.methods]
    if marked:  # the modules this command edits, marked in their own column (not by colour alone)
        cols.append("edited")
    for c in cols:
        t.add_column(
            c.replace("rank_", "rank ") if c.startswith("rank_") else c,
            justify="left" if c == "module" else "right",
            no_wrap=True,
        )
    for r in rows:
        style = "red" if marked and r["module"] in marked else None
        cells = [one_line(fmt_number(r.get(c))) for c in cols if c != "edited"]
        if marked:
            cells.append("✕" if r["module"] in marked else "")
        t.add_row(*cells, style=style)
    out.print(t)


def print_agreement(table: ScoreTable) -> None:
    """Spearman ρ / Kendall τ between every pair of methods' rankings, and their top-K overlap."""
    agr = table.meta.get("agreement") or []
    if state["quiet"] or not agr:
        return
    k = agr[0]["top_k"]
    t = Table(header_style="bold", title="agreement between the methods' rankings", title_justify="left")
    for c in ("methods", "Spearman ρ", "p", "Kendall τ", "p", f"top-{k} overlap"):
        t.add_column(c, justify="left" if c == "methods" else "right")

    def f(x):
        return "" if x is None else f"{x:.3f}" if abs(x) >= 1e-3 else f"{x:.1e}"

    for a in agr:
        t.add_row(
            f"{a['a']} vs {a['b']}",
            f(a["spearman"]),
            f(a["spearman_p"]),
            f(a["kendall"]),
            f(a["kendall_p"]),
            f"{a['top_overlap']}/{k}",
        )
    out.print(t)


def stage_side_outputs(
    outputs: Outputs,
    table: ScoreTable,
    json_path: Path | None,
    csv_path: Path | None,
    plot_path: Path | None,
    marked=(),
) -> None:
    """Stage the --json / --csv / --plot files (``-``: standard output) to be committed with the command's
    other outputs."""
    if json_path:
        outputs.stage_text(json_path, table.to_json())
    if csv_path:
        outputs.stage_text(csv_path, table.to_csv())
    if plot_path:
        from ..report.plots import heatmap  # matplotlib: only when a plot is asked for

        first = next(iter(table.methods.values()))
        outputs.stage_file(Path(plot_path), lambda tmp: heatmap(table, tmp, column=first.primary, marked=marked))


def write_side_outputs(
    table: ScoreTable, json_path: Path | None, csv_path: Path | None, plot_path: Path | None, marked=()
) -> None:
    """The side files of a command that writes nothing else, all or none."""
    with Outputs() as outputs:
        stage_side_outputs(outputs, table, json_path, csv_path, plot_path, marked)
        outputs.commit()


def check_selection(edited: Any, verb: str, allow_empty: bool) -> None:
    """A rule that selects no module would write an unchanged adapter with exit 0 (a silent no-op): refuse
    it with the score range, unless ``--allow-empty``, which writes it after a loud warning."""
    if len(edited.selection.selected):
        return
    rule = edited.selection.rule
    vals = [v for v in edited.scores.column(rule.column) if isinstance(v, (int, float)) and math.isfinite(v)]
    rng = (
        f"{rule.column} ranges from {fmt_number(min(vals))} to {fmt_number(max(vals))} over {len(vals)} modules"
        if vals
        else f"no module has a finite {rule.column}"
    )
    msg = f"the selection is empty: {rule.describe()} {verb} 0 of {len(edited.scores)} modules ({rng})"
    if not allow_empty:
        raise UsageError(
            msg + "; nothing written (pick a threshold inside that range, use --top K, or --allow-empty to write "
            "the unchanged adapter)"
        )
    report("warning", "bold yellow", msg + "; writing the unchanged adapter anyway (--allow-empty)")


def default_base(base: str | None, adapter_dir: Any, methods: list[str] | None = None) -> str | None:
    """``--base`` when given (or when none of ``methods`` reads a base), else the adapter's ``base_model_name_or_path`` when that resolves here (a local
    model or a hub id in the local cache; nothing is downloaded), said on stderr; else None."""
    if base is not None or adapter_dir is None:
        return base
    from ..scoring import REGISTRY
    from ..weights.resolve import base_from_adapter

    if methods is not None and not any("base" in REGISTRY[m].requires for m in methods if m in REGISTRY):
        return base
    found = base_from_adapter(adapter_dir)
    if found is not None and not state["quiet"]:
        err.print(f"base: {one_line(found)} (from the adapter's base_model_name_or_path)", highlight=False)
    return found
