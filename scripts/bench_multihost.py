"""`digits train` as one process and as a loopback job of 2 processes, side by side.

  python scripts/bench_multihost.py --data-dir ../shared/data/mnist --epochs 1

Both use 4 devices in all: 1 process x 4 CPU devices, and 2 processes x 2 (`digits launch -n 2`),
the same global batches. Each round runs both as whole processes with an empty compilation cache,
alternating which goes first, and reports wall time, the last epoch's training seconds and test
accuracy. The two processes share the machine's cores and all-reduce over loopback TCP, so the
job proves correctness here, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run(command: list[str], env: dict) -> tuple[float, dict]:
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - start
  if done.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
  return wall, json.loads(done.stdout)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--validation", type=int, default=5000, help="held-out training images")
  args = parser.parse_args()
  digits = [sys.executable, "-m", "flaxdigits.cli.main"]
  # The XLA_FLAGS of a caller that forces a device count would override --cpu-devices.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  setups = {
      "1 process x 4 devices": digits + ["train", "--cpu-devices", "4"],
      "2 processes x 2 devices": digits + ["launch", "-n", "2", "--", "train", "--cpu-devices",
                                           "2"],
  }
  setups = {name: command + ["--validation", str(args.validation)]
            for name, command in setups.items()}
  results: dict[str, list[tuple[float, dict]]] = {name: [] for name in setups}
  for round_ in range(args.rounds):
    order = list(setups) if round_ % 2 == 0 else list(reversed(setups))
    for name in order:
      work = tempfile.mkdtemp(prefix="flaxdigits-mh-")
      try:
        results[name].append(run(setups[name] + [
            "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--batch-size",
            str(args.batch_size), "--json", "--quiet", "-c", os.path.join(work, "ckpt")],
            env | {"FLAXDIGITS_CACHE_DIR": os.path.join(work, "xla")}))
      finally:
        shutil.rmtree(work, ignore_errors=True)
  print(f"| setup | wall s (median of {args.rounds}) | last epoch's training s | "
        "test accuracy |")
  print("|---|---|---|---|")
  for name, runs in results.items():
    walls = [wall for wall, _ in runs]
    train_s = [out["history"][-1]["train_seconds"] for _, out in runs]
    accuracy = [out["test"]["accuracy"] for _, out in runs]
    print(f"| {name} | {statistics.median(walls):.1f} | {statistics.median(train_s):.1f} | "
          f"{100 * statistics.median(accuracy):.2f}% |")
  one, two = (statistics.median(w for w, _ in runs) for runs in results.values())
  print(f"\n2 processes / 1 process wall time: {two / one:.2f}x")


if __name__ == "__main__":
  main()
