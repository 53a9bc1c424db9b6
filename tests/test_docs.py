"""The documents the code and the front door point at exist: every ``*.md`` file a docstring or comment in dfsmerge/
cites is in the repository, every cited section of docs/design.md is one of its sections, every relative link (and
its anchor) of README.md and docs/ resolves, and the README opens with the two commands a newcomer runs."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dfsmerge"
MD_NAME = re.compile(r"(?<![\w./-])((?:\.\./|[\w-]+/)*[\w.-]+\.md)\b")


def docs_text(source: str) -> list[str]:
    """The comments and the bare string statements (module, class, function and attribute docstrings) of a module."""
    out = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    out += [node.value.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    return out


def written_names(source: str) -> set[str]:
    """``*.md`` names the code writes (a whole string constant in code, as ``"README.md"`` of a model card)."""
    return {node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and MD_NAME.fullmatch(node.value)}


def cited_md(path: Path) -> list[str]:
    source = path.read_text()
    return [m for text in docs_text(source) for m in MD_NAME.findall(text)]


def resolves(name: str, cited_from: Path) -> bool:
    """A cited name is a path from the repository root, from the package root or from the citing file's folder."""
    return any((base / name).is_file() for base in (ROOT, PKG, cited_from.parent))


def test_the_citation_finder_reads_comments_and_docstrings():
    src = ('"""See docs/design.md section 4."""\nx = 1  # measured in kernels/NOTES.md\n'
           'def f():\n    """Writes ``report.md``."""\n    return "report.md"\n')
    assert [m for t in docs_text(src) for m in MD_NAME.findall(t)] == ["kernels/NOTES.md", "docs/design.md",
                                                                        "report.md"]
    assert written_names(src) == {"report.md"}
    assert resolves("docs/design.md", PKG / "x.py") and resolves("kernels/NOTES.md", PKG / "x.py")
    assert not resolves("DESIGN.md", PKG / "x.py") and not resolves("../shared/notes/x.md", PKG / "zoo" / "x.py")


def test_every_md_file_a_docstring_or_comment_cites_exists():
    files = sorted(PKG.rglob("*.py"))
    written = set().union(*(written_names(p.read_text()) for p in files))
    missing, checked = [], 0
    for path in files:
        for name in cited_md(path):
            if "/" not in name and name in written:  # an output file's name (the card README.md, report.md)
                continue
            checked += 1
            if not resolves(name, path):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert checked >= 15, "the docstrings cite docs/design.md and others: the finder found too few"
    assert missing == [], f"docstrings or comments cite files that are not in the repository: {missing}"


def test_every_cited_design_section_exists():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited = {(str(p.relative_to(ROOT)), n) for p in PKG.rglob("*.py")
             for n in re.findall(r"docs/design\.md\s+section (\d+)", p.read_text())}
    assert cited and sections, "the docstrings cite sections of docs/design.md"
    assert sorted(c for c in cited if c[1] not in sections) == []


LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_of_the_readme_and_docs_resolves():
    assert slug("## Results: the toy zoo".lstrip("# ")) == "results-the-toy-zoo"
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            file = page.parent / target if target else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert broken == []


def test_the_readme_is_a_front_door():
    """At most 150 lines, and its first commands are the two a newcomer runs: the demo and the tests (the test
    command is what CI runs, .ci/run)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[0] for line in first_block] == ["./scripts/demo", "./scripts/test"]
    assert text.index("```bash") < text.index("\n## ", text.index("## Quickstart") + 1)
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()
