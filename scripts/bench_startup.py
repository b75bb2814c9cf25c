"""Cold-process start-up of `digits --help`: median wall time, and proof that JAX stays unloaded.

  python scripts/bench_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import _checkout

PROBE = ("import sys\nfrom flaxdigits.cli.main import main\nsys.argv = ['digits', '--help']\n"
         "try:\n  main()\nexcept SystemExit:\n  pass\n"
         "print('heavy modules loaded:', sorted(m for m in ('jax', 'flax', 'tensorflow', 'orbax')"
         " if m in sys.modules), file=sys.stderr)\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=20)
  args = parser.parse_args()
  digits = _checkout.installed_digits()
  times = []
  for _ in range(args.runs + 1):
    start = time.perf_counter()
    subprocess.run([digits, "--help"], check=True, capture_output=True)
    times.append(time.perf_counter() - start)
  times = times[1:]  # the first run warms the OS file cache
  probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
  print(f"digits --help: median {1000 * statistics.median(times):.0f} ms, "
        f"max {1000 * max(times):.0f} ms over {args.runs} cold processes")
  print(probe.stderr.strip())


if __name__ == "__main__":
  main()
