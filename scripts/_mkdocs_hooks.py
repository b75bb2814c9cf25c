"""MkDocs hooks for the documentation site (mkdocs.yml): the CLI reference page is generated
from the Typer app at build time, so it cannot drift from `digits --help`."""

from __future__ import annotations

import subprocess
import sys

MARKER = "<!-- the digits CLI reference, generated -->"


def on_page_markdown(markdown: str, page, **_) -> str:
  """Replaces MARKER with Typer's Markdown for the `digits` app."""
  if MARKER not in markdown:
    return markdown
  generated = subprocess.run(
      [sys.executable, "-m", "typer", "flaxdigits.cli.main", "utils", "docs", "--name", "digits"],
      check=True, capture_output=True, text=True).stdout
  # Typer's page starts with its own "# `digits`" title; the page has one already.
  body = generated.split("\n", 1)[1] if generated.startswith("# ") else generated
  return markdown.replace(MARKER, body.replace("\n## ", "\n### "))
