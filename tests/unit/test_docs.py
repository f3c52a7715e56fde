"""The README and docs/ stay true to the repository: the generated configuration reference is
current, every relative link and anchor resolves, every `make` target named exists, the README stays
a front door, and nothing cites files outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import config_reference
from tests import _proc

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
MIN_DOC_PAGES = 6

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
MAKE_CALL = re.compile(r"(?:^|[\s;&|(`])make\s+([a-z][a-z0-9-]*)(\*?)")
TARGET = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*:(?!=)", re.MULTILINE)
# Built from pieces so this file does not match its own search.
OUTSIDE_REFS = r"\.\./" + "shared|" + "shared" + "/spec"


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def split_code(text: str) -> tuple[str, list[str]]:
    """``(prose, code)``: the text outside fenced blocks, and every fenced block line plus every
    inline code span (where command lines are written; a span may wrap onto the next line)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    joined = "\n".join(prose)
    return joined, code + [m.group(2) for m in INLINE_CODE.finditer(joined)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces
    to hyphens; link text only (``[text](url)`` -> ``text``)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    bad = []
    for m in LINK.finditer(INLINE_CODE.sub("", prose)):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: ({target})"
        if not dest.exists():
            bad.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return bad


def makefile_targets() -> set[str]:
    return set(TARGET.findall((ROOT / "Makefile").read_text(encoding="utf-8"))) - {".PHONY"}


def unknown_make_targets(path: Path, targets: set[str]) -> list[str]:
    _, code = split_code(path.read_text(encoding="utf-8"))
    bad = []
    for chunk in code:
        for m in MAKE_CALL.finditer(chunk):
            name, glob = m.group(1), m.group(2)
            known = any(t.startswith(name) for t in targets) if glob else name in targets
            if not known:
                bad.append(f"{path.relative_to(ROOT)}: `make {name}{glob}` is not a Makefile target")
    return bad


def test_configuration_reference_is_what_the_generator_prints_now():
    written = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert written == config_reference.render(), (
        "docs/configuration.md is out of date with the typed config: run `make docs`"
    )


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    bad = [problem for page in pages() for problem in broken_links(page)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_make_target_the_readme_and_docs_name_is_in_the_makefile():
    targets = makefile_targets()
    assert {"test", "pretrain", "docs"} <= targets  # the parse itself works
    bad = [problem for page in pages() for problem in unknown_make_targets(page, targets)]
    assert not bad, "\n".join(bad)


def test_the_readme_is_a_front_door_and_the_docs_have_their_pages():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"
    )
    found = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(found) >= MIN_DOC_PAGES, f"docs/ has {len(found)} pages ({found}), expected >= {MIN_DOC_PAGES}"


def test_nothing_outside_ci_cites_files_beyond_the_repository():
    result = _proc.run(
        ["git", "grep", "--untracked", "-n", "-I", "-E", OUTSIDE_REFS, "--", ".", ":(exclude).ci"],
        timeout=60,
        cwd=ROOT,
    )
    # git grep: 0 = matches found, 1 = none, anything else = git itself failed
    assert result.returncode in (0, 1), f"git grep failed ({result.returncode}): {result.stderr}"
    assert result.returncode == 1, "references to files outside the repository:\n" + result.stdout


def test_every_test_the_docs_name_exists():
    """The silent-failure table and the pages name tests by function: each must still exist."""
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    named = set()
    for page in pages():
        for chunk in split_code(page.read_text(encoding="utf-8"))[1]:
            named |= set(re.findall(r"\b(test_\w+)\b(?!\.py)", chunk))  # file names are not tests
    missing = sorted(named - defined)
    assert not missing, f"tests named in the docs that no longer exist: {missing}"


def test_every_make_target_is_phony():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))
    phony = set(next(line for line in makefile.splitlines() if line.startswith(".PHONY:")).split()[1:])
    assert targets == phony, (
        f"not .PHONY: {sorted(targets - phony)}; .PHONY but no target: {sorted(phony - targets)}"
    )
