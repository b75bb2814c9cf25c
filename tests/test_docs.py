"""The documentation site's build hook (scripts/_mkdocs_hooks.py); CI builds the site itself
with `mkdocs build --strict`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import _mkdocs_hooks  # noqa: E402


def test_the_cli_reference_is_generated_from_the_typer_app():
  page = _mkdocs_hooks.on_page_markdown(f"# CLI reference\n\n{_mkdocs_hooks.MARKER}\n", None)
  assert _mkdocs_hooks.MARKER not in page and page.startswith("# CLI reference")
  for command in ("train", "eval", "eda", "predict", "serve", "export", "launch"):
    assert f"### `digits {command}`" in page
  assert "--no-reject" in page and "--validation" in page
  assert page.count("\n# ") == 0  # one title: Typer's own is dropped


def test_pages_without_the_marker_are_left_alone():
  assert _mkdocs_hooks.on_page_markdown("# Design\n\ntext\n", None) == "# Design\n\ntext\n"
