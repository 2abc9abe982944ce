"""A tiny document model rendered twice: Markdown (images linked) and one self-contained HTML file
(images embedded as base64 PNG). Keeps both reports identical in content."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
padding:0 16px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:6px}h2{margin-top:1.8em;border-bottom:1px solid #eee}
h3{margin-top:1.3em}table{border-collapse:collapse;margin:10px 0 4px;font-size:.86em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fbfbfc}.note{color:#555;font-size:.85em;margin-top:2px}
img{max-width:100%;border:1px solid #eee;margin:6px 0}figcaption{color:#555;font-size:.85em;margin-bottom:14px}
.verdict{background:#f3f7ff;border-left:4px solid #3b6fd8;padding:8px 14px;margin:10px 0}
.warn{background:#fff8e6;border-left:4px solid #e0a000;padding:8px 14px}
code,pre{background:#f6f8fa;border-radius:4px;font-size:.85em}pre{padding:8px;overflow-x:auto;white-space:pre-wrap}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
td.good{color:#0a7a32;font-weight:600}td.bad{color:#b3261e;font-weight:600}
"""


@dataclass
class Doc:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str, css: str | None = None) -> None:
        self.blocks.append(("p", (text, css)))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(
        self, headers: list[str], rows: list[list[str]], note: str | None = None, classes: list[list[str]] | None = None
    ) -> None:
        self.blocks.append(("table", (headers, rows, note, classes)))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (Path(path), caption)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def details(self, summary: str, text_blocks: list[tuple[str, str]]) -> None:
        """Collapsible list of (heading, preformatted text)."""
        self.blocks.append(("details", (summary, text_blocks)))

    # -- renderers ---------------------------------------------------------------------------------
    def markdown(self, rel_to: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, b in self.blocks:
            if kind == "h":
                out += ["#" * b[0] + " " + b[1], ""]
            elif kind == "p":
                text, css = b
                out += [("> " + text) if css in ("verdict", "warn") else text, ""]
            elif kind == "ul":
                out += [f"- {x}" for x in b] + [""]
            elif kind == "table":
                headers, rows, note, _ = b
                out.append("| " + " | ".join(_md(h) for h in headers) + " |")
                out.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
                out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
                if note:
                    out += ["", f"*{note}*"]
                out.append("")
            elif kind == "img":
                path, cap = b
                try:
                    rel = path.relative_to(rel_to)
                except ValueError:
                    rel = path
                out += [f"![{cap}]({rel.as_posix()})", "", f"*{cap}*", ""]
            elif kind == "code":
                f = _fence(b)
                out += [f, b, f, ""]
            elif kind == "details":
                summary, items = b
                out += [f"<details><summary>{html.escape(summary)}</summary>", ""]
                for head, text in items:
                    f = _fence(text)
                    out += [f"**{head}**", "", f, text, f, ""]
                out += ["</details>", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{e(self.title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h{b[0]}>{_inline(b[1])}</h{b[0]}>")
            elif kind == "p":
                text, css = b
                out.append(f"<p class='{css}'>{_inline(text)}</p>" if css else f"<p>{_inline(text)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b) + "</ul>")
            elif kind == "table":
                headers, rows, note, classes = b
                t = ["<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
                for i, r in enumerate(rows):
                    cells = []
                    for j, c in enumerate(r):
                        cls = classes[i][j] if classes and i < len(classes) and j < len(classes[i]) else ""
                        cells.append(f"<td class='{cls}'>{_inline(c)}</td>" if cls else f"<td>{_inline(c)}</td>")
                    t.append("<tr>" + "".join(cells) + "</tr>")
                t.append("</tbody></table>")
                if note:
                    t.append(f"<div class='note'>{_inline(note)}</div>")
                out.append("".join(t))
            elif kind == "img":
                path, cap = b
                data = base64.b64encode(Path(path).read_bytes()).decode()
                out.append(
                    f"<figure><img alt='{e(cap)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{e(cap)}</figcaption></figure>"
                )
            elif kind == "code":
                out.append(f"<pre>{e(b)}</pre>")
            elif kind == "details":
                summary, items = b
                inner = "".join(f"<p><b>{e(h)}</b></p><pre>{e(t)}</pre>" for h, t in items)
                out.append(f"<details><summary>{e(summary)}</summary>{inner}</details>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``: a model's output that contains a fence of its
    own (a code answer) must not close the block and spill the rest into the report as Markdown."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md(c: Any) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """Escape, then the two Markdown inline forms the report uses: **bold** and `code`."""
    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return t
