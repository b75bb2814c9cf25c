"""Running the code of another checkout (another commit) in this environment, for benchmarks
that compare two releases side by side."""

import shutil
import sys
from pathlib import Path


def import_code(root: str) -> str:
  """Python source that imports the flaxdigits of the checkout whose folder the expression `root`
  gives, with its cli/ folder as flaxdigits.cli (an installed flaxdigits maps it so; a bare
  checkout does not)."""
  return f"""
import sys, types
root = {root}
sys.path.insert(0, root)
import flaxdigits
cli = types.ModuleType("flaxdigits.cli"); cli.__path__ = [root + "/cli"]
sys.modules["flaxdigits.cli"] = flaxdigits.cli = cli
"""


# Imports the flaxdigits of the checkout at sys.argv[1].
IMPORT = import_code("sys.argv[1]")
_CLI = IMPORT + """
from flaxdigits.cli.main import main
sys.argv = ["digits", *sys.argv[2:]]
main()
"""


def digits(root: Path) -> list[str]:
  """The command line that runs `digits` from the checkout at `root`: append its arguments."""
  return [sys.executable, "-c", _CLI, str(root)]


def installed_digits() -> str:
  """This environment's `digits` command: the one next to this Python, whether or not its folder
  is on PATH, else the one on PATH. Exits with one line if there is none."""
  found = shutil.which("digits", path=str(Path(sys.executable).parent)) or shutil.which("digits")
  if found is None:
    sys.exit("no `digits` command next to this Python or on PATH: pip install -e . first")
  return found
