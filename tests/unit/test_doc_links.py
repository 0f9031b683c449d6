"""The README and docs stand alone: no link or path reference points outside the
repository, and every relative link points at a file that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path written in text or code: ../x, ./x, or an absolute path of this machine
PATH_REFERENCE = re.compile(r"(?<![\w/.:])((?:\.\./|\./)[\w./-]+|/(?:work|home|tmp|root)/[\w./-]*)")


def documents() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in listed if (ROOT / p).is_file()]


def inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http://127.0.0.1:8000/docs, ...) or an anchor
        file = (doc.parent / target.split("#", 1)[0]).resolve()
        assert inside(file), f"{doc.name}: link {target} leaves the repository"
        assert file.exists(), f"{doc.name}: link {target} points at nothing"
    for reference in PATH_REFERENCE.findall(text):
        if reference.startswith("/"):
            pytest.fail(f"{doc.name}: absolute path {reference} of one machine")
        assert inside(doc.parent / reference), f"{doc.name}: {reference} leaves the repository"


def test_the_design_is_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "](docs/architecture.md)" in readme
    assert (ROOT / "docs" / "architecture.md").is_file()
