"""How long `to_mnist` takes per input in a warm process, by kind of input.

  python scripts/bench_preprocess.py [--against ../old-checkout] [--rounds 3]

Inputs, all as encoded bytes (what the server and `digits predict` receive), made from MNIST
test digits by scripts/make_realistic_set.py's renderers:
  phone-12mp  12-megapixel phone photos (4000x3000 JPEGs, some with an EXIF rotation)
  wild        photos, scans and canvas exports of 100-600 px (the realistic set's six kinds)
  pad-280     the drawing pad's canvas: a 280x280 opaque PNG, black strokes on white
  pad-112     the same, shrunk to the 112 px the page uploads

Each round runs every checkout in a fresh process (alternating, so that drift hits all alike),
which warms up on the inputs once and then times each input --repeats times, keeping its best.
Prints the median milliseconds per kind for each checkout and round.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "scripts"))
import _checkout  # noqa: E402  (scripts/, just put on the path)

KINDS = ("phone-12mp", "wild", "pad-280", "pad-112")


def pad_png(ink28: np.ndarray, side: int = 280) -> bytes:
  """The page's 280x280 canvas (RGBA, opaque, black ink on white) as a PNG of `side` px."""
  ink = np.asarray(Image.fromarray(ink28).resize((200, 200), Image.BICUBIC)) / 255.0
  gray = np.full((280, 280), 255.0)
  gray[40:240, 40:240] = 255 * (1 - np.clip(ink * 1.6, 0, 1))  # canvas strokes are solid
  rgba = np.dstack([np.uint8(gray)] * 3 + [np.full((280, 280), 255, np.uint8)])
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").resize((side, side), Image.BOX).save(buffer, "PNG")
  return buffer.getvalue()


def make_inputs(images: np.ndarray, count: int, seed: int = 0) -> dict[str, list[bytes]]:
  import make_realistic_set as realistic  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  inputs: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
  for i in range(count):
    ink = images[i] / 255.0
    photo, exif = realistic.phone_photo(ink, rng, size=(4000, 3000))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=88, exif=exif)
    inputs["phone-12mp"].append(buffer.getvalue())
    kind = realistic.KINDS[i % 6]
    image, ext = realistic.render(kind, ink, rng)
    side = int(rng.integers(100, 601))
    image = image.resize((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if ext == "jpg" else "PNG", quality=85)
    inputs["wild"].append(buffer.getvalue())
    inputs["pad-280"].append(pad_png(images[i]))
    inputs["pad-112"].append(pad_png(images[i], 112))
  return inputs


CHILD = _checkout.IMPORT + """
import json, pickle, time
from flaxdigits.preprocess import to_mnist
inputs, repeats = pickle.load(open(sys.argv[2], "rb")), int(sys.argv[3])
for data in [d for kind in inputs.values() for d in kind]:
  to_mnist(data)  # warm: imports, first calls
result = {}
for kind, items in inputs.items():
  best = []
  for data in items:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      to_mnist(data)
      times.append(time.perf_counter() - start)
    best.append(min(times) * 1000)
  result[kind] = best
print(json.dumps(result))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--against", type=Path, help="a checkout of another commit to compare")
  parser.add_argument("--data-dir", default=str(HERE / "tests" / "data" / "mnist-small"))
  parser.add_argument("--count", type=int, default=12, help="inputs of each kind")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  import pickle  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel

  from flaxdigits.data import load_mnist  # pylint: disable=import-outside-toplevel
  test = load_mnist(args.data_dir, ("test",))["test"]
  inputs = make_inputs(test.images, args.count)
  roots = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
  medians: dict[str, dict[str, list[float]]] = {name: {k: [] for k in KINDS} for name in roots}
  with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
    pickle.dump(inputs, f)
    f.flush()
    for round_ in range(args.rounds):
      for name, root in roots.items():
        done = subprocess.run([sys.executable, "-c", CHILD, str(root), f.name,
                               str(args.repeats)], capture_output=True, text=True, check=False)
        if done.returncode:
          sys.exit(f"{name}: {done.stderr.strip().splitlines()[-1:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        line = []
        for kind in KINDS:
          medians[name][kind].append(statistics.median(result[kind]))
          line.append(f"{kind} {statistics.median(result[kind]):7.2f} ms")
        print(f"round {round_ + 1} {name:8s} " + "  ".join(line), flush=True)
  for name in roots:
    print(f"median over rounds, {name}: " + "  ".join(
        f"{kind} {statistics.median(medians[name][kind]):.2f} ms" for kind in KINDS))


if __name__ == "__main__":
  main()
