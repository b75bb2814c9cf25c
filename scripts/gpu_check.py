"""A prepared check for a machine with GPUs: train on all of them, evaluate, then predict on CPU.

  python scripts/gpu_check.py --data-dir /path/to/mnist [--epochs 1]

1. `digits train --epochs N` on every local accelerator (one process; the data-parallel mesh
   spans them all), with --json.
2. `digits eval` of that checkpoint on the accelerator.
3. In a process limited to the CPU (JAX_PLATFORMS=cpu): the checkpoint's inference bundle
   loads (it is lowered for cpu, cuda, rocm and tpu) and classifies the test images with the
   accuracy the accelerator measured (within 0.05 points), and `digits predict` answers.
Prints each step's time and figures; exits non-zero with the reason on the first failure. On a
machine without an accelerator it runs the same steps on the CPU (how its smoke test runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIGITS = [sys.executable, "-m", "flaxdigits.cli.main"]

BUNDLE_ON_CPU = """
import sys, json, jax, numpy as np
from flaxdigits import bundle, data
assert jax.default_backend() == "cpu", jax.default_backend()
path = bundle.find(sys.argv[1])
loaded = bundle.load(path)
test = data.load_mnist(sys.argv[2], ("test",))["test"]
images = data.normalize(test.images)[..., 0]
probs = np.concatenate([np.asarray(loaded.probabilities(images[i:i + 1000]))
                        for i in range(0, len(images), 1000)])
program = jax.export.deserialize(bytearray(np.load(path)["program"].tobytes()))
print(json.dumps({"accuracy": float(np.mean(probs.argmax(-1) == test.labels)),
                  "platforms": list(program.platforms)}))
"""


def step(title: str, command: list[str], env: dict | None = None) -> tuple[float, str]:
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - start
  if done.returncode:
    sys.exit(f"FAILED: {title} (exit {done.returncode}):\n{done.stderr[-3000:]}")
  print(f"ok  {title}: {seconds:.1f} s")
  return seconds, done.stdout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--preset", default="default")
  parser.add_argument("--validation", type=int, default=5000, help="held-out training images")
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
        f"jax {jax.__version__}")
  if devices[0].platform == "cpu":
    print("note: no accelerator here; running the same steps on the CPU")
  work = Path(tempfile.mkdtemp(prefix="flaxdigits-gpu-check-"))
  ckpt = work / "ckpt"
  env = os.environ | {"FLAXDIGITS_CACHE_DIR": str(work / "xla")}
  _, out = step(f"train {args.epochs} epoch(s) on {len(devices)} device(s)", DIGITS + [
      "train", "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--preset",
      args.preset, "--validation", str(args.validation), "-c", str(ckpt), "--json", "--quiet"],
      env)
  trained = json.loads(out)
  print(f"    test accuracy {100 * trained['test']['accuracy']:.2f}%, "
        f"{trained['history'][-1]['train_seconds']:.1f} s for the last epoch's steps")
  _, out = step("eval on the accelerator", DIGITS + [
      "eval", "-c", str(ckpt), "--data-dir", args.data_dir, "--json"], env)
  evaluated = json.loads(out)
  print(f"    accuracy {100 * evaluated['accuracy']:.2f}%")
  cpu = env | {"JAX_PLATFORMS": "cpu"}
  _, out = step("the bundle on the CPU", [sys.executable, "-c", BUNDLE_ON_CPU, str(ckpt),
                                          args.data_dir], cpu)
  on_cpu = json.loads(out)
  print(f"    accuracy {100 * on_cpu['accuracy']:.2f}%, lowered for {', '.join(on_cpu['platforms'])}")
  if abs(on_cpu["accuracy"] - evaluated["accuracy"]) > 0.0005:
    sys.exit(f"FAILED: the bundle on CPU scores {on_cpu['accuracy']:.4f}, the accelerator "
             f"{evaluated['accuracy']:.4f}")
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from flaxdigits import data  # pylint: disable=import-outside-toplevel
  test = data.load_mnist(args.data_dir, ("test",))["test"]
  image = work / "digit.png"
  Image.fromarray(255 - test.images[0]).resize((112, 112)).save(image)
  _, out = step("digits predict on the CPU", DIGITS + ["predict", "-c", str(ckpt), str(image),
                                                       "--json"], cpu)
  answer = json.loads(out)[0]
  print(f"    predicted {answer['digit']} (label {test.labels[0]})")
  print("all checks passed")


if __name__ == "__main__":
  main()
