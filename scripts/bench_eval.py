"""Evaluation throughput once compiled: all 10,000 MNIST test images through `evaluate`.

  python scripts/bench_eval.py --checkpoint ckpt --data-dir ../shared/data/mnist

One warm-up pass compiles; then --repeats timed passes (exact evaluation: loss, confusion matrix,
predictions). Prints the median images/s and the arithmetic rate it implies, and for scale the
rate of a large float32 matrix product on the same devices, about the most arithmetic XLA gets
out of these cores: divided by the CNN's forward FLOPs per image, a ceiling on images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--batch-size", type=int, default=1000)
  args = parser.parse_args()
  from flaxdigits import parallel
  parallel.split_cpu_into_devices()
  import jax
  from flaxdigits.checkpoint import load_model
  from flaxdigits.data import load_mnist
  from flaxdigits.evaluate import evaluate
  model, meta = load_model(args.checkpoint)
  test = load_mnist(args.data_dir, ("test",))["test"]
  evaluate(model, test, batch_size=args.batch_size)  # compile
  rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    result = evaluate(model, test, batch_size=args.batch_size)
    rates.append(len(test) / (time.perf_counter() - start))
  # Forward FLOPs per image of the configured CNN (multiply-adds x 2).
  config, side, c_in, flops = meta["model"], 28, 1, 0
  for c_out in config["conv_features"]:
    flops += 2 * side * side * c_out * c_in * config["kernel_size"] ** 2
    side, c_in = side // 2, c_out
  widths = [side * side * c_in] + config["dense_features"] + [config["num_classes"]]
  flops += sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
  rate = statistics.median(rates)
  matmul = _matmul_flops_per_sec()
  print(f"jax {jax.__version__}, {len(jax.devices())} CPU device(s); accuracy "
        f"{100 * result.accuracy:.2f}%; median {rate:,.0f} images/s over {args.repeats} passes "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}); {flops / 1e6:.1f} MFLOP/image forward "
        f"= {rate * flops / 1e9:.0f} GFLOP/s")
  print(f"float32 2048x2048 matrix product on {len(jax.devices())} device(s) at once: "
        f"{matmul / 1e9:.0f} GFLOP/s (best of 10), so at most {matmul / flops:,.0f} images/s at "
        f"that rate")


def _matmul_flops_per_sec(n: int = 2048) -> float:
  """Best rate of an n x n x n float32 product, one per device, all devices at once."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in jax.devices()]
  product = jax.jit(lambda x: x @ x)
  jax.block_until_ready([product(x) for x in a])
  best = float("inf")
  for _ in range(10):
    start = time.perf_counter()
    jax.block_until_ready([product(x) for x in a])
    best = min(best, time.perf_counter() - start)
  return len(a) * 2 * n ** 3 / best


if __name__ == "__main__":
  main()
