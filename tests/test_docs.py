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


ROOT = Path(__file__).resolve().parents[1]


def _digits_commands(text: str) -> list[list[str]]:
  """Every `digits ...` command line in the text's bash blocks, split as a shell would."""
  import re
  import shlex
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for part in re.split(r"&&|;", line.split("#")[0] if not line.lstrip().startswith("#")
                           else ""):
        words = shlex.split(re.sub(r"\$\{?\w+\}?", "1", part))  # $seed in a loop, say
        if words and words[0] == "digits":
          commands.append(words[1:])
  return commands


def test_every_digits_command_in_the_readme_and_docs_parses():
  # Each is run for real elsewhere (train, eval, predict ...); here every one as written must
  # name a command and options that exist, with values of the right type.
  import typer.main

  from flaxdigits.cli.main import app
  group = typer.main.get_command(app)
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  seen = 0
  for page in pages:
    for args in _digits_commands(page.read_text()):
      if args[0] == "launch":  # launch's COMMAND after -- is a train command line
        args = args[args.index("--") + 1:]
      command = group.get_command(None, args[0])
      assert command is not None, f"{page.name}: digits {' '.join(args)}"
      try:
        command.make_context(args[0], args[1:])
      except Exception as e:  # a usage error: an unknown option, a value of the wrong type
        raise AssertionError(f"{page.name}: digits {' '.join(args)}: {e}") from None
      seen += 1
  assert seen >= 15
