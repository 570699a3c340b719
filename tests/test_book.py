"""The book: a failing page fails the build (with the project's own _config.yml), and every run
file the figure pages read is committed."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repro.core.paths import ROOT

PAGE = """---
jupytext:
  text_representation:
    format_name: myst
kernelspec:
  display_name: Python 3
  name: python3
---
# Page

```{{code-cell}} ipython3
{code}
```
"""


def build(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    book = tmp_path / "book"
    book.mkdir()
    shutil.copytree(ROOT / "book" / "_ext", book / "_ext")  # the book's own Sphinx extension
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (book / "intro.md").write_text(PAGE.format(code=code))
    exe = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(exe), "build", str(book)], cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("code,ok", [("print(1 + 1)", True), ("raise RuntimeError('figure failed')", False)])
def test_page_errors_fail_the_build(tmp_path, code, ok):
    result = build(tmp_path, code)
    assert (result.returncode == 0) == ok, result.stdout[-2000:] + result.stderr[-2000:]
    if ok:
        assert (tmp_path / "_build" / "html" / "intro.html").exists()


def test_figure_pages_read_committed_run_files():
    pages = list((ROOT / "book" / "figures").glob("*.md"))
    assert pages
    for page in pages:
        for path in re.findall(r'"(data/runs/[^"]+\.nc)"', page.read_text()):
            assert (ROOT / path).exists(), f"{page.name} reads missing {path}"


def test_every_toc_entry_exists():
    import yaml

    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    for name in files:
        assert any((ROOT / "book" / f"{name}{ext}").exists() for ext in (".md", ".ipynb")), name


# What a rendered page must not show: Python warnings and tracebacks, or this machine's paths.
DIRTY = re.compile(r"Traceback \(most recent call last\)|\b\w*Warning\b:|" + re.escape(str(ROOT)) + "|"
                   + re.escape(str(Path.home())) + "/")


def test_the_whole_book_builds_clean(tmp_path):
    """The real book: it builds, Sphinx reports no warning, and no page shows a traceback, a
    Python warning or a local path (run notebooks show their stdout, not their progress bars)."""
    exe = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run([str(exe), "build", str(ROOT / "book"), "--path-output", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if "WARNING" in line and "Kernel is running over TCP" not in line]
    assert not warnings, "\n".join(warnings[:20])
    html = tmp_path / "_build" / "html"
    pages = [p for p in html.rglob("*.html") if "_static" not in p.parts]
    assert len(pages) > 20
    dirty = {str(p.relative_to(html)): m.group(0) for p in pages if (m := DIRTY.search(p.read_text()))}
    assert not dirty, dirty
