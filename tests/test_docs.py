"""The documentation: README.md stays short, every page of docs/ is in mkdocs.yml's nav, every relative
link of README.md and docs/ reaches an existing file (and heading), and every `segpipe` command is
documented. `make test` also runs `mkdocs build --strict`; these checks need no MkDocs and take
well under a second."""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
INLINE_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(?P<target>\S+)", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def prose(text: str) -> list[str]:
    """The lines of `text` outside fenced code blocks (links and headings in code are not markdown)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slugify(title: str) -> str:
    """The anchor of a heading as MkDocs (Python-Markdown's toc) makes it, for the headings used here
    (GitHub's anchors agree on them)."""
    text = INLINE_LINK.sub(lambda m: m["text"], title)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """Every heading anchor of the markdown file `path` (repeats get _1, _2, ... as in MkDocs)."""
    found: set[str] = set()
    for line in prose(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = base = slugify(match["title"])
            n = 0
            while slug in found:
                n += 1
                slug = f"{base}_{n}"
            found.add(slug)
    return found


def links(path: Path) -> list[str]:
    """The link targets of the markdown file `path`, outside code."""
    text = "\n".join(INLINE_CODE.sub("", line) for line in prose(path.read_text(encoding="utf-8")))
    return [m["target"] for m in INLINE_LINK.finditer(text)] + [m["target"] for m in REFERENCE_LINK.finditer(text)]


def nav_files(node: object) -> list[str]:
    """The page paths of mkdocs.yml's `nav` (nested sections included; external URLs left out)."""
    if isinstance(node, str):
        return [] if SCHEME.match(node) else [node]
    if isinstance(node, dict):
        return [path for value in node.values() for path in nav_files(value)]
    if isinstance(node, list):
        return [path for item in node for path in nav_files(item)]
    return []


def mkdocs_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the details to a page of docs/"
    )


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = mkdocs_config()
    assert config.get("docs_dir", "docs") == "docs"
    listed = nav_files(config["nav"])
    on_disk = {page.relative_to(DOCS).as_posix() for page in pages()}
    assert on_disk, "docs/ has no pages"
    assert len(listed) == len(set(listed)), f"pages listed twice in mkdocs.yml's nav: {listed}"
    assert not on_disk - set(listed), f"pages of docs/ missing from mkdocs.yml's nav: {sorted(on_disk - set(listed))}"
    assert not set(listed) - on_disk, f"mkdocs.yml's nav lists missing pages: {sorted(set(listed) - on_disk)}"
    assert "index.md" in listed


@pytest.mark.parametrize("source", [README, *pages()], ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_resolve(source: Path) -> None:
    broken = []
    for target in links(source):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not checked offline
        path_part, _, anchor = target.partition("#")
        dest = (source.parent / path_part).resolve() if path_part else source
        if path_part.startswith("/"):
            broken.append(f"{target}: absolute path (use a relative one)")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {dest.relative_to(REPO_ROOT).as_posix()} has no heading #{anchor}")
    assert not broken, f"{source.relative_to(REPO_ROOT).as_posix()}: broken links:\n  " + "\n  ".join(broken)


def test_the_readme_links_into_docs() -> None:
    targets = {target.partition("#")[0] for target in links(README)}
    assert "docs/index.md" in targets
    missing = sorted(
        page.relative_to(REPO_ROOT).as_posix()
        for page in pages()
        if page.relative_to(REPO_ROOT).as_posix() not in targets
    )
    assert not missing, f"README.md's 'Where to read on' does not link these pages: {missing}"


def commands(parser: argparse.ArgumentParser, prefix: str = "segpipe") -> list[str]:
    """Every command line of `parser`: `segpipe train`, `segpipe dataset add`, `segpipe bench infer`, ..."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(f"{prefix} {name}")
                found.extend(commands(sub, f"{prefix} {name}"))
    return found


def test_every_command_is_documented() -> None:
    from pipeline.cli import build_parser

    text = "\n".join(page.read_text(encoding="utf-8") for page in pages())
    listed = commands(build_parser())
    assert "segpipe bench infer" in listed and "segpipe dataset add" in listed
    missing = [command for command in listed if not re.search(re.escape(command) + r"(?![\w-])", text)]
    assert not missing, f"commands of `segpipe --help` no page of docs/ mentions: {missing}"
