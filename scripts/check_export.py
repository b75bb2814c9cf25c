"""Exports a checkpoint to ONNX and TFLite and compares each file, in its own runtime, with JAX.

  python scripts/check_export.py --checkpoint ckpt --data-dir ../shared/data/mnist --out exports

For each format: export time, file size, top-1 agreement with the JAX model and the largest
absolute difference of probabilities (calibrated, at the checkpoint's temperature, as the
exports give them) over all 10,000 MNIST test images, and each runtime's accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--out", default="exports")
  args = parser.parse_args()
  import jax
  from flaxdigits import export
  from flaxdigits.checkpoint import load_model
  from flaxdigits.data import load_mnist, normalize
  model, meta = load_model(args.checkpoint)
  test = load_mnist(args.data_dir, ("test",))["test"]
  images = normalize(test.images)
  # The exports carry the checkpoint's calibration: compare them with JAX at its temperature.
  fn = jax.jit(export.probabilities_fn(model, export.temperature(meta)))
  batches = range(0, len(images), 1000)
  expected = np.concatenate([np.asarray(fn(images[i:i + 1000])) for i in batches])
  print(f"JAX model: accuracy {100 * np.mean(expected.argmax(-1) == test.labels):.2f}%")
  for fmt in export.FORMATS:
    start = time.perf_counter()
    result = export.export(model, meta, fmt, Path(args.out) / f"digits.{fmt}", overwrite=True)
    seconds = time.perf_counter() - start
    got = np.concatenate([export.run(result.path, images[i:i + 1000]) for i in batches])
    agree = np.mean(got.argmax(-1) == expected.argmax(-1))
    print(f"{fmt:7s} {result.size_bytes / 1e6:.2f} MB, exported and checked in {seconds:.1f} s; "
          f"top-1 agreement {100 * agree:.2f}% ({int(agree * len(images))}/{len(images)}), "
          f"max |dp| {np.abs(got - expected).max():.1e}; accuracy "
          f"{100 * np.mean(got.argmax(-1) == test.labels):.2f}%")


if __name__ == "__main__":
  main()
