"""The report's document model: text from a model's outputs stays inside its code block."""

from __future__ import annotations

from pathlib import Path

from markdown_it import MarkdownIt

from safeprune.report.doc import Doc


def _blocks(md: str) -> list:
    return [t for t in MarkdownIt("commonmark").parse(md) if t.type in ("fence", "heading_open")]


def test_a_generation_with_its_own_code_fence_stays_in_one_block(tmp_path: Path):
    """A flipped prompt's "before" text that is a code answer (```, then #include lines) used to close the
    report's fence early, so its #include lines rendered as Markdown headings."""
    answer = "before: Sure, here is code:\n\n```\n#include <iostream>\n#include <unistd.h>\n````x\nafter:  I cannot"
    d = Doc("t")
    d.details("flips", [("now refused · id 77", answer)])
    d.code("```python\nprint(1)\n```")
    md = d.markdown(tmp_path)
    toks = _blocks(md)
    assert [t.type for t in toks] == ["heading_open", "fence", "fence"]  # the title, then exactly two code blocks
    assert toks[1].content.rstrip("\n") == answer and toks[2].content.rstrip("\n") == "```python\nprint(1)\n```"
    assert "`````" in md  # a fence longer than the text's longest backtick run (4)


def test_plain_code_keeps_the_three_backtick_fence(tmp_path: Path):
    d = Doc("t")
    d.code("x = 1")
    assert "```\nx = 1\n```" in d.markdown(tmp_path)
