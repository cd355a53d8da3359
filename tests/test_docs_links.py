"""The documentation's links hold: relative links and anchors in README.md, docs/ and the families' READMEs
resolve, and so do references like `docs/design.md#layers` or `docs/bundle.md section "Layout"` written in
code, tests, benchmarks and docs. No reference points at a file outside the repository (a design note, an
issue)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "models").glob("*/README.md")])
SOURCES = sorted(p for d in ("epicode_edge", "tests", "bench", "models", "docs") for p in (REPO / d).rglob("*")
                 if p.suffix in (".py", ".md") and p.is_file()) + [REPO / "README.md"]

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are checked the same way below
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
# a repository file with an anchor, or a file followed by `section "Heading"`
REF_ANCHOR = re.compile(r"((?:docs/[\w.-]+|README|models/[\w-]+/README)\.md)#([\w-]+)")
REF_SECTION = re.compile(r"((?:docs/[\w.-]+|README|models/[\w-]+/README)\.md),? section \"([^\"]+)\"")
REF_FILE = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)")
FORBIDDEN = re.compile(r"(?<![\w/])DESIGN\.md|(?i:\bissue #?\d+)")  # notes that are not in the repository


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces
    to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    out, seen, fence = set(), {}, False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def headings(md: Path) -> set[str]:
    return {re.sub(r"^#{1,6}\s+", "", ln).strip() for ln in md.read_text(encoding="utf-8").splitlines()
            if re.match(r"#{1,6}\s", ln)}


def _without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def check_target(src: Path, target: str) -> str | None:
    """Why the link `target` in file src does not resolve, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    dest = (src.parent / path).resolve() if path else src
    if not dest.exists():
        return f"{path}: no such file"
    if not str(dest).startswith(str(REPO)):
        return f"{path}: outside the repository"
    if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
        return f"#{anchor}: no such heading in {dest.relative_to(REPO)}"
    return None


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_in_the_docs_resolve(md):
    text = _without_code_blocks(md.read_text(encoding="utf-8"))
    bad = [f"{t}: {why}" for t in LINK.findall(text) + IMAGE.findall(text) if (why := check_target(md, t))]
    assert not bad, f"{md.relative_to(REPO)}: " + "; ".join(bad)


def test_references_in_code_and_docs_resolve():
    bad = []
    for src in SOURCES:
        text = src.read_text(encoding="utf-8")
        where = src.relative_to(REPO)
        for path, anchor in REF_ANCHOR.findall(text):
            target = REPO / path
            if not target.is_file():
                bad.append(f"{where}: {path} does not exist")
            elif anchor not in anchors(target):
                bad.append(f"{where}: {path}#{anchor}: no such heading")
        for path, name in REF_SECTION.findall(text):
            target = REPO / path
            if not target.is_file() or name not in headings(target):
                bad.append(f"{where}: {path} section \"{name}\": no such heading")
        for path in REF_FILE.findall(text):
            if not (REPO / path).is_file():
                bad.append(f"{where}: {path} does not exist")
    assert not bad, "\n".join(bad)


def test_no_reference_to_notes_outside_the_repository():
    me = Path(__file__).resolve()
    bad = [f"{src.relative_to(REPO)}:{i}: {line.strip()}" for src in SOURCES if src.resolve() != me
           for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1) if FORBIDDEN.search(line)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_what_it_should(tmp_path):
    """The checker itself: a missing file, a missing anchor and a good anchor."""
    md = REPO / "docs" / "design.md"
    assert check_target(md, "bundle.md") is None
    assert check_target(md, "decoding.md#the-pick") is None
    assert "no such file" in check_target(md, "nope.md")
    assert "no such heading" in check_target(md, "decoding.md#nope")
    assert slug("What a bundle may contain, and what is checked") == "what-a-bundle-may-contain-and-what-is-checked"
    assert slug("The `--full` run") == "the---full-run"
