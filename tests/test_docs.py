"""The documentation runs: every ```python block of the tour, and the strict MkDocs build.

Each page of docs/ is one test. Its ```python blocks run in order in one namespace (a page is one
session: later blocks use what earlier ones defined), in a fresh temporary working directory, with
LIGHTCNN_ENGINE=numpy so that a snippet that runs a model compiles nothing unless it asks for the
numba engine itself. A snippet that prints a number asserts it on the next line, so a page whose
numbers drift from the code fails here. Each block is compiled under the Markdown file's name with
its own line numbers, so a traceback points at the line of the .md file.

A block preceded by the comment  <!-- needs: PATH -->  (PATH relative to the repository, e.g.
../shared/weights) is skipped, with the path in the reason, when PATH does not exist; the rest of
the page still runs. ```bash, ```text and other blocks are never run.

Time: the snippets use tiny shapes, and the whole tour runs in about 15 s once the Numba kernels it
calls are cached. On an empty kernel cache the first run also compiles about 30 kernel
specialisations (float64 ones for the gradient checks of page 7), which takes a minute or two of
wall time on a shared 2-core machine. The rest of the suite compiles and reuses the same kernels.
No time limit is asserted, since a limit would be flaky on a shared machine.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

_FENCE = re.compile(r"^```(\S*)\s*$")
_NEEDS = re.compile(r"^<!--\s*needs:\s*(\S+)\s*-->\s*$")


def python_blocks(text):
    """[(first line number of the code (1-based), code, needed path or None)] of the ```python blocks."""
    blocks, lines, i, needs = [], text.splitlines(), 0, None
    while i < len(lines):
        line = lines[i]
        marker = _NEEDS.match(line.strip())
        if marker:
            needs = marker.group(1)
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            lang, start, i = fence.group(1), i + 1, i + 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            if i == len(lines):
                raise ValueError(f"unclosed code fence opened at line {start}")
            if lang == "python":
                blocks.append((start + 1, "\n".join(lines[start:i]) + "\n", needs))
            needs = None
        elif line.strip():
            needs = None  # the marker applies to the block right after it only
        i += 1
    return blocks


def test_python_blocks_parser():
    text = "# t\n```python\na = 1\n```\n```bash\nls\n```\n<!-- needs: nowhere -->\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n", None), (10, "b = 2\n", "nowhere")]


def test_every_tour_page_has_runnable_blocks():
    pages = {p.name for p in (DOCS / "tour").glob("*.md")}
    assert len(pages) == 10, sorted(pages)
    for page in sorted((DOCS / "tour").glob("*.md")):
        assert python_blocks(page.read_text(encoding="utf-8")), f"{page.name} has no ```python block"


PAGES = [p for p in sorted(DOCS.glob("*.md")) + sorted((DOCS / "tour").glob("*.md"))
         if python_blocks(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCNN_ENGINE", "numpy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(page)])
    namespace = {"__name__": "__docs__"}
    skipped = []
    for line, code, needs in python_blocks(page.read_text(encoding="utf-8")):
        if needs is not None and not (REPO / needs).exists():
            skipped.append(f"line {line}: needs {REPO / needs}")
            continue
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
    if skipped:
        pytest.skip(f"{page.name}: ran the other blocks; skipped " + "; ".join(skipped))


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('mkdocs/mkdocstrings not installed (pip install -e ".[docs]")')
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    assert (tmp_path / "site" / "tour" / "01-convolution" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "kernels.conv" / "index.html").exists()
