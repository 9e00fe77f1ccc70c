"""The project's docs stay linked: every ``docs/<file>.md#anchor`` the code, cards, recipes and docs cite exists.

The docs carry explicit ``<a id="..."></a>`` anchors (stable across heading rewording); a citation to a missing
file or anchor is a dead link a reader follows from a docstring, so it fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A citation: docs/<name>.md, optionally #anchor, optionally followed by more anchors of the same file
# ("docs/methods.md#dragon and #scorers", "docs/methods.md#frechet, #vendi, #mmd").
CITE = re.compile(r"docs/([a-z_]+\.md)((?:#[a-z0-9-]+)?(?:(?:,| and| to) #[a-z0-9-]+)*)")
LINK = re.compile(r"\]\((?:\./)?([a-z_]*\.md)?#([a-z0-9-]+)\)")
SOURCES = ("visalign", "tests", "benchmarks", "scorers", "pipelines", "assets", "docs")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml"}


def _anchors() -> dict[str, set[str]]:
    return {f.name: set(re.findall(r'<a id="([^"]+)"></a>', f.read_text())) for f in DOCS.glob("*.md")}


def _files():
    yield ROOT / "README.md"
    for folder in SOURCES:
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file())


def test_every_cited_doc_anchor_exists():
    anchors = _anchors()
    assert {"architecture.md", "methods.md", "extending.md", "shapes.md"} <= set(anchors)
    dead, cited = [], 0
    for path in _files():
        text = path.read_text(errors="replace")
        for name, tail in CITE.findall(text):
            cited += 1
            if name not in anchors:
                dead.append(f"{path.relative_to(ROOT)}: docs/{name}")
            dead += [f"{path.relative_to(ROOT)}: docs/{name}#{a}" for a in re.findall(r"#([a-z0-9-]+)", tail)
                     if a not in anchors.get(name, set())]
        if path.parent == DOCS:
            for target, anchor in LINK.findall(text):
                if anchor not in anchors.get(target or path.name, set()):
                    dead.append(f"{path.relative_to(ROOT)}: link {target or path.name}#{anchor}")
    assert cited > 50  # the code does cite the docs; a regex that matched nothing would pass vacuously
    assert not dead, "dead doc links:\n" + "\n".join(dead)


def test_the_code_cites_no_notes_outside_the_repository():
    stale = re.compile(r"\b(?:DESIGN|METHODS|STYLE|SHAPES-NOTES)\.md\b|\.\./shared/")
    hits = [f"{p.relative_to(ROOT)}" for p in _files() if stale.search(p.read_text(errors="replace"))]
    assert not hits, f"files citing notes a user of the repository does not have: {hits}"
