"""Wall time of whole `digits` processes, as a user runs them: predict one image, eval, eda.

  python scripts/bench_cold.py --checkpoint ckpt --image some.png --data-dir ../shared/data/mnist

Each command runs --runs times as a fresh process with an empty XLA compilation cache (a
first-ever run) and --runs times reusing a filled one (every later run), interleaved. Medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time


def timed(command: list[str], env: dict) -> float:
  start = time.perf_counter()
  subprocess.run(command, check=True, capture_output=True, env=env)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--image", required=True)
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--only", nargs="*", help="commands to time: predict, eval, eda")
  args = parser.parse_args()
  digits = shutil.which("digits")
  commands = {
      "digits predict (1 image)": [digits, "predict", "-c", args.checkpoint, args.image],
      "digits eval (10,000 images)": [digits, "eval", "-c", args.checkpoint, "--data-dir",
                                      args.data_dir],
      "digits eda (70,000 images)": [digits, "eda", "--data-dir", args.data_dir, "--out",
                                     tempfile.mkdtemp(prefix="flaxdigits-eda-")],
  }
  if args.only:
    commands = {k: v for k, v in commands.items() if k.split()[1] in args.only}
  for name, command in commands.items():
    filled = tempfile.mkdtemp(prefix="flaxdigits-xla-")
    timed(command, os.environ | {"FLAXDIGITS_CACHE_DIR": filled})
    empty, warm = [], []
    for _ in range(args.runs):
      cache = tempfile.mkdtemp(prefix="flaxdigits-xla-")
      empty.append(timed(command, os.environ | {"FLAXDIGITS_CACHE_DIR": cache}))
      shutil.rmtree(cache, ignore_errors=True)
      warm.append(timed(command, os.environ | {"FLAXDIGITS_CACHE_DIR": filled}))
    shutil.rmtree(filled, ignore_errors=True)
    print(f"{name:28s} {len(warm)} runs each: with cache median {statistics.median(warm):5.2f} s"
          f" ({min(warm):.2f}-{max(warm):.2f}); empty cache median "
          f"{statistics.median(empty):5.2f} s ({min(empty):.2f}-{max(empty):.2f})")


if __name__ == "__main__":
  main()
