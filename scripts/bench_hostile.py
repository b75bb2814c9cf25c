"""What hostile inputs cost: wall time and peak memory of a fresh process, case by case.

  python scripts/bench_hostile.py [--against ../old-checkout] [--runs 2]

Cases (each in its own fresh process, which reports its wall time and VmHWM, the peak resident
memory of its own address space; ru_maxrss would include the parent's across exec):
  png-bomb        to_mnist on an RGB PNG of ~160 KB declaring 6320x6320 (40 Mpx)
  png-largest     to_mnist on a 4096x4096 RGB PNG, the largest non-JPEG decoded
  jpeg-12mp       to_mnist on a 4000x3000 JPEG of a drawn digit
  filled-disc     to_mnist on a 1000x1000 PNG of one filled black disc (all "stroke")
  idx-gzip-bomb   read_idx on a ~2 MB gzip holding 2 GB after a header promising 10 images
  train-into-file `digits train -c FILE` (a file, not a folder) until the process exits

With --against DIR (a checkout of another commit, sharing this environment), every case also
runs on that code, alternating with this one. --scale below 1 shrinks the images and the gzip
bomb, for a smoke test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import _checkout
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1]
# Imports the code of a checkout, then runs the case and prints "seconds peak_mb outcome".
PRELUDE = _checkout.IMPORT + """
import time
def report(start, outcome):
  peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
  print(f"{time.perf_counter() - start:.2f} {int(peak) // 1024} {outcome[:70]!r}")
start = time.perf_counter()  # the CLI case times its imports too, as a user waits for them
"""
TO_MNIST = """
from flaxdigits.preprocess import to_mnist
start = time.perf_counter()
try:
  to_mnist(sys.argv[2]); outcome = "ok"
except ValueError as e:
  outcome = str(e)
report(start, outcome)
"""
CASES = {
    "png-bomb": TO_MNIST,
    "png-largest": TO_MNIST,
    "jpeg-12mp": TO_MNIST,
    "filled-disc": TO_MNIST,
    "idx-gzip-bomb": """
from flaxdigits.data import read_idx
start = time.perf_counter()
try:
  read_idx(sys.argv[2], 2051); outcome = "read"
except ValueError as e:
  outcome = str(e).split(": ", 1)[-1]
report(start, outcome)
""",
    "train-into-file": """
from flaxdigits.cli.main import main
sys.argv = ["digits", "train", "--epochs", "1", "--batch-size", "64", "--validation", "64",
            "--data-dir", sys.argv[3],
            "-c", sys.argv[2]]
try:
  main()
except SystemExit as e:
  outcome = f"exit {e.code}"
else:
  outcome = "exit 0"
report(start, outcome)
""",
}


def make_inputs(folder: Path, scale: float) -> dict[str, list[str]]:
  side = lambda n: max(64, int(n * scale))  # noqa: E731
  page = np.full((side(6320), side(6320)), 255, np.uint8)
  page[::97, ::89] = np.random.default_rng(0).integers(0, 255, page[::97, ::89].shape)
  Image.fromarray(page).convert("RGB").save(folder / "bomb.png", optimize=True)
  Image.fromarray(page[:side(4096), :side(4096)]).convert("RGB").save(folder / "largest.png")
  photo = np.full((side(3000), side(4000)), 235, np.uint8)
  h, w = photo.shape
  photo[h // 4:3 * h // 4, w // 2 - w // 40:w // 2 + w // 40] = 30  # a "1"
  Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
  y, x = np.mgrid[:side(1000), :side(1000)]
  r = side(1000) / 2
  Image.fromarray(np.where((y - r) ** 2 + (x - r) ** 2 < (0.5 * r) ** 2, 0, 255).astype(
      np.uint8)).save(folder / "disc.png")
  header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
  packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
  with open(folder / "bomb-idx3-ubyte.gz", "wb") as f:
    f.write(packer.compress(header))
    for _ in range(max(1, int(128 * scale))):
      f.write(packer.compress(bytes(1 << 24)))
    f.write(packer.flush())
  (folder / "a-file").write_text("not a folder")
  data = HERE / "tests" / "data" / "mnist-small"
  return {"png-bomb": [folder / "bomb.png"], "png-largest": [folder / "largest.png"],
          "jpeg-12mp": [folder / "photo.jpg"], "filled-disc": [folder / "disc.png"],
          "idx-gzip-bomb": [folder / "bomb-idx3-ubyte.gz"],
          "train-into-file": [folder / "a-file", data]}


def run_case(root: Path, case: str, args: list, timeout: float) -> str:
  start = time.perf_counter()
  try:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + CASES[case], str(root), *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
        env=os.environ | {"FLAXDIGITS_CACHE_DIR": tempfile.mkdtemp()})
  except subprocess.TimeoutExpired:
    return f"killed after {timeout:.0f} s"
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    return f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
  seconds, peak, outcome = lines[-1].split(" ", 2)
  wall = time.perf_counter() - start
  return f"{float(seconds):.2f} s in the case ({wall:.1f} s process), peak {peak} MB, {outcome}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--against", type=Path, help="a checkout of another commit to compare")
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--cases", nargs="*", default=list(CASES))
  parser.add_argument("--timeout", type=float, default=420)
  parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  roots = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
  with tempfile.TemporaryDirectory() as folder:
    inputs = make_inputs(Path(folder), args.scale)
    for case in args.cases:
      for run in range(args.runs):
        for name, root in roots.items():  # alternating: drift hits both alike
          outcome = run_case(root, case, inputs[case], args.timeout)
          print(f"{case:16s} run {run + 1} {name:8s} {outcome}", flush=True)


if __name__ == "__main__":
  main()
