"""The documentation site builds with --strict (a broken link or anchor, a page missing from the nav or an
API reference that does not resolve fails), and the README stays a front page of at most 200 lines."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "vicreg_loss" in api and "load_backbone" in api, "mkdocstrings rendered the API reference"


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    for link in ("docs/getting-started.md", "docs/methods/index.md", "docs/benchmarks.md"):
        assert f"({link}" in readme and (REPO / link).is_file()
