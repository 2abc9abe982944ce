"""``safeprune inspect``: list an adapter's LoRA modules (no base model needed)."""

from __future__ import annotations

from rich.table import Table

from ..io.text import natural_key, one_line
from .app import app, handle_errors, out
from .options import AdapterArg, AllowPickleOpt


@app.command("inspect")
@handle_errors
def inspect_cmd(adapter: AdapterArg, allow_pickle: AllowPickleOpt = False) -> None:
    """List the adapter's LoRA modules (no base model needed)."""
    from ..adapter import load_adapter

    ad = load_adapter(adapter, allow_pickle=allow_pickle)
    t = Table(
        header_style="bold",
        title=one_line(f"{ad.path}: {len(ad)} LoRA modules, {ad.num_params:,} parameters"),
        title_justify="left",
    )
    for c in ("module", "r", "alpha", "scaling", "in", "out", "dtype"):
        t.add_column(c, justify="left" if c == "module" else "right")
    for m in sorted(ad, key=lambda m: natural_key(m.name)):
        t.add_row(
            one_line(m.name),
            str(m.r),
            f"{m.alpha:g}",
            f"{m.scaling:g}",
            str(m.in_features),
            str(m.out_features),
            str(m.lora_A.dtype).replace("torch.", ""),
        )
    out.print(t)
    if ad.extra_tensors:
        out.print(
            f"{len(ad.extra_tensors)} other tensors kept as they are: "
            + ", ".join(one_line(k) for k in list(ad.extra_tensors)[:5])
            + (" ..." if len(ad.extra_tensors) > 5 else "")
        )
