"""Wall time of whole `digits` processes, as a user runs them: predict one image, eval, eda.

  python scripts/bench_cold.py --checkpoint ckpt --image some.png --data-dir ../shared/data/mnist

Each command runs --runs times as a fresh process with an empty XLA compilation cache (a
first-ever run) and --runs times reusing a filled one (every later run), interleaved. Medians.
With --against DIR (a checkout of another commit, sharing this environment), each run of a
command also runs that checkout's CLI, alternating.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import _checkout


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
  parser.add_argument("--against", type=Path, help="a checkout of another commit to compare")
  parser.add_argument("--against-checkpoint",
                      help="the checkpoint for --against (default: --checkpoint), where the "
                      "checkout reads another checkpoint format")
  args = parser.parse_args()
  commands = {
      "digits predict (1 image)": ["predict", "-c", args.checkpoint, args.image],
      "digits eval (10,000 images)": ["eval", "-c", args.checkpoint, "--data-dir", args.data_dir],
      "digits eda (70,000 images)": ["eda", "--data-dir", args.data_dir, "--out",
                                     tempfile.mkdtemp(prefix="flaxdigits-eda-")],
  }
  if args.only:
    commands = {k: v for k, v in commands.items() if k.split()[1] in args.only}
  launchers = {"this": [_checkout.installed_digits()]}
  if args.against:
    launchers["against"] = _checkout.digits(args.against.resolve())
  for name, arguments in commands.items():
    filled = {who: tempfile.mkdtemp(prefix="flaxdigits-xla-") for who in launchers}
    empty: dict[str, list[float]] = {who: [] for who in launchers}
    warm: dict[str, list[float]] = {who: [] for who in launchers}
    own = {who: arguments for who in launchers}
    if args.against_checkpoint and "-c" in arguments:
      own["against"] = [args.against_checkpoint if a == args.checkpoint else a for a in arguments]
    for who, launcher in launchers.items():
      timed(launcher + own[who], os.environ | {"FLAXDIGITS_CACHE_DIR": filled[who]})
    for _ in range(args.runs):
      for who, launcher in launchers.items():  # alternating: drift hits both alike
        cache = tempfile.mkdtemp(prefix="flaxdigits-xla-")
        empty[who].append(timed(launcher + own[who],
                                os.environ | {"FLAXDIGITS_CACHE_DIR": cache}))
        shutil.rmtree(cache, ignore_errors=True)
        warm[who].append(timed(launcher + own[who],
                               os.environ | {"FLAXDIGITS_CACHE_DIR": filled[who]}))
    for who in launchers:
      shutil.rmtree(filled[who], ignore_errors=True)
      label = name if len(launchers) == 1 else f"{name} [{who}]"
      print(f"{label:38s} {len(warm[who])} runs each: with cache median "
            f"{statistics.median(warm[who]):5.2f} s ({min(warm[who]):.2f}-{max(warm[who]):.2f}); "
            f"empty cache median {statistics.median(empty[who]):5.2f} s "
            f"({min(empty[who]):.2f}-{max(empty[who]):.2f})")


if __name__ == "__main__":
  main()
