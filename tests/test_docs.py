"""The documentation holds together: README.md and docs/*.md link only to files, folders and
headings that exist, and the README stays a short front door that starts with the two set-up
commands.

Plain pytest and the standard library: no server, no model, no environment of the project.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold code spans.
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, lowercase, everything
    but letters, digits, spaces, hyphens and underscores removed, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of a Markdown file; a repeated heading gets
    -1, -2, ... in order."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative Markdown link outside code; web and mail links
    are left out."""
    found: list[tuple[int, str]] = []
    for number, line in prose_lines(path):
        # A code span is no link, but a link's text may be code: [`x`](y) keeps its link.
        without_code = CODE_SPAN.sub("code", line)
        for match in LINK.finditer(without_code):
            target = match.group("target")
            if SCHEME.match(target):
                continue  # http(s)://, mailto: and any other scheme
            found.append((number, target))
    return found


def where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def broken_files() -> list[str]:
    broken = []
    for path in markdown_files():
        for number, target in links(path):
            file_part = unquote(target.split("#", 1)[0])
            if not file_part:
                continue  # an in-page anchor
            if not (path.parent / file_part).exists():
                broken.append(f"{where(path, number)}: {target} (no such file or folder)")
    return broken


def broken_anchors() -> list[str]:
    broken = []
    cache: dict[Path, set[str]] = {}
    for path in markdown_files():
        for number, target in links(path):
            if "#" not in target:
                continue
            file_part, anchor = target.split("#", 1)
            linked = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not linked.is_file():
                continue  # reported by test_links_point_at_existing_files
            if linked.suffix.lower() != ".md":
                broken.append(
                    f"{where(path, number)}: {target} (an anchor into a non-Markdown file)"
                )
                continue
            if linked not in cache:
                cache[linked] = anchors(linked)
            if unquote(anchor) not in cache[linked]:
                broken.append(
                    f"{where(path, number)}: {target} (no heading #{anchor} in "
                    f"{linked.relative_to(ROOT)})"
                )
    return broken


def test_docs_folder_has_pages() -> None:
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ holds no Markdown pages"


def test_links_point_at_existing_files() -> None:
    broken = broken_files()
    assert not broken, "links to files or folders that do not exist:\n" + "\n".join(broken)


def test_anchors_match_headings() -> None:
    broken = broken_anchors()
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail into docs/"
    )


def test_readme_starts_with_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks, "README.md has no code block"
    first = blocks[0]
    missing = [command for command in ("make run", "make test") if command not in first]
    assert not missing, f"the first code block of README.md lacks {missing}:\n{first}"
    first_section = text.find("\n## ")
    assert first_section == -1 or text.find(first) < first_section, (
        "the set-up commands must come before the first section of README.md"
    )


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_page_starts_with_title_and_summary(page: Path) -> None:
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{page.name} does not start with a '# Title'"
    summary = next((line for line in lines[1:] if line.strip()), "")
    assert summary and not summary.startswith("#"), (
        f"{page.name} has no one-line summary under its title"
    )


def test_slug_follows_github() -> None:
    assert slug("The larger model (`make model-large`)") == "the-larger-model-make-model-large"
    assert slug("Delivery: at least once, nothing lost") == "delivery-at-least-once-nothing-lost"
    assert slug("Batch jobs: what they store, where, for how long") == (
        "batch-jobs-what-they-store-where-for-how-long"
    )
    assert slug("snake_case and  two spaces") == "snake_case-and--two-spaces"
