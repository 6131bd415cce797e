"""The docs' relative links resolve: every link and image in README.md, docs/*.md and benchmarks/README.md that is
not a URL points to a file or folder of the repository, and every #anchor to a heading of the file it names (the
anchors GitHub makes). Pure Python, no ComfyUI."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}```.*?^ {0,3}```[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks (a link in code is not a link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link syntax dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The targets of the links and images of a Markdown file that are not URLs (code spans and blocks left out)."""
    text = CODE_SPAN.sub("x", prose(path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def broken(path: Path) -> list[str]:
    """What is wrong with the relative links of ``path``: a missing file or folder, or a missing anchor."""
    problems = []
    for target in sorted(set(links(path))):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file or folder")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: {file_part or path.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc):
    assert doc.is_file(), doc
    problems = broken(doc)
    assert not problems, f"{doc.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(problems)


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## `./idlora start`\n\n## Faces, identity and the metrics\n\n## Run\n\n"
                                   "## Run\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#idlora-start) [ok](a.md#faces-identity-and-the-metrics) [ok](a.md#run-1) "
                    "[ok](#here) [web](https://example.com/x.md) ![img](a.md)\n\n## Here\n\n"
                    "[no file](missing.md) [no anchor](a.md#nowhere) [`code`](a.md#run-2)\n\n"
                    "```\n[in a code block](ignored.md)\n```\n", encoding="utf-8")
    problems = broken(page)
    assert len(problems) == 3, problems
    assert any(p.startswith("missing.md:") for p in problems)
    assert any(p.startswith("a.md#nowhere:") for p in problems)
    assert any(p.startswith("a.md#run-2:") for p in problems)
