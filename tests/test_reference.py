"""The API reference: every public name has a docstring and an entry, and the site builds strictly."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import psjobs

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"


@pytest.mark.parametrize("name", psjobs.__all__)
def test_every_public_name_has_its_own_docstring(name: str) -> None:
    obj = getattr(psjobs, name)
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"psjobs.{name} has no docstring of its own"


def test_every_public_name_has_a_reference_entry() -> None:
    entries = set(re.findall(r"^::: psjobs\.(\w+)\s*$", REFERENCE.read_text(), re.M))
    assert not set(psjobs.__all__) - entries, "docs/reference.md lacks these names"
    assert not entries - set(psjobs.__all__), "docs/reference.md names what psjobs does not export"


def test_every_page_is_in_the_site() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert not {p for p in pages if f": {p}" not in nav}, "pages missing from mkdocs.yml's nav"


@pytest.mark.timeout(180)
def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    html = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in psjobs.__all__:
        assert f'id="psjobs.{name}"' in html, f"the reference page has no entry for psjobs.{name}"
