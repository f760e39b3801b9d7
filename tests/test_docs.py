"""The documentation's promises: every ```python example in README.md and docs/ runs as written, and the README
links only to files of the repository.

The examples of one page run in order in one namespace (a later block may use what an earlier one built), in a
fresh temporary working directory, on the shipped demo model or tiny configs (no download). A block that cannot run
here (a GPU, a real checkpoint, a benchmark's official files) is preceded by the line
``<!-- docs-test: skip: <why> -->``; keep them rare. The site itself (links, anchors, API references) is checked by
``mkdocs build --strict`` (``make docs``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(?P<why>\S.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})(?P<info>[^`]*)$")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAX_SKIPPED = 3


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every fenced ```python block of ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, lang = m["fence"], m["indent"], m["info"].strip().split(" ")[0]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if lang == "python":
            before = next((line for line in reversed(lines[:i]) if line.strip()), "")
            skip = SKIP.fullmatch(before.strip())
            code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
            out.append((i + 2, code, skip["why"] if skip else None))
        i = end + 1
    return out


PAGES = [p for p in _pages() if _blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowkern.scorers import base

    monkeypatch.chdir(tmp_path)
    # a page may register a scorer (docs/scorers.md): on a copy of the registry, so that it does not outlive the page;
    # the built-ins register on first use, before the copy, so that they stay registered
    base.scorer_names()
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    namespace: dict = {"__name__": "__docs__"}
    for line, code, skip in _blocks(page):
        if skip is not None:
            continue
        # dont_inherit: the example runs as a reader's script does, without this module's `from __future__` imports
        # (with them a dataclass in an example would see its annotations as strings of a module that does not exist)
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec", dont_inherit=True), namespace)


def test_examples_found() -> None:
    """The extractor sees the README's tour and the pages' examples (an extractor that finds nothing tests nothing)."""
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/ops.md", "docs/trace.md", "docs/prune.md", "docs/cam.md", "docs/scorers.md"} <= names
    tour = _blocks(ROOT / "README.md")[0][1]
    assert "flowkern.trace(" in tour and "flowkern.prune(" in tour and "flowkern.cam(" in tour


def test_skipped_examples_are_rare_and_say_why() -> None:
    skipped = [(p, line, why) for p in _pages() for line, _, why in _blocks(p) if why is not None]
    assert len(skipped) <= MAX_SKIPPED, skipped
    assert all(len(why) >= 10 for _, _, why in skipped), skipped
    # a marker must sit right above a python block: one anywhere else would silently skip nothing
    markers = sum(bool(SKIP.fullmatch(line.strip())) for p in _pages() for line in p.read_text("utf-8").splitlines())
    assert markers == len(skipped), "a docs-test: skip marker that is not right above a ```python block"


def test_readme_links_stay_in_the_repository() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [m["target"] for m in LINK.finditer(text)]
    assert targets, "no links found: the pattern is broken"
    for target in targets:
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"README links outside: {target}"
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"README links outside the repository: {target}"
        assert path.exists(), f"README links to a missing file: {target}"


def test_extractor_reads_markers_and_indented_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- docs-test: skip: needs a CUDA device -->\n\n```python\nb = 2\n```\n"
        "\n- item\n\n  ```python\n  c = 3\n  ```\n\n```console\n$ flowkern info\n```\n",
        encoding="utf-8",
    )
    assert _blocks(page) == [(4, "a = 1", None), (10, "b = 2", "needs a CUDA device"), (16, "c = 3", None)]


def test_sources_point_only_at_pages_that_exist() -> None:
    """A docstring or comment that cites a docs page names one that exists, and none cites a design file that is not
    in the repository."""
    page = re.compile(r"\bdocs/[\w/.-]+\.md\b")
    outside = re.compile(r"\b(?:DESIGN|REVIEW)\.md\b")
    me = Path(__file__).resolve()
    sources = [p for d in ("flowkern", "benchmarks", "tests", "csrc", "tools") if (ROOT / d).is_dir()
               for p in sorted((ROOT / d).rglob("*")) if p.suffix in {".py", ".cpp", ".h", ".sh"} and p != me]
    cited = 0
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not outside.search(text), f"{path.relative_to(ROOT)} cites a file that is not in the repository"
        for ref in page.findall(text):
            cited += 1
            assert (ROOT / ref).is_file(), f"{path.relative_to(ROOT)} cites {ref}, which does not exist"
    assert cited, "no source cites a docs page: the pattern is broken"
