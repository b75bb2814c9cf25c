"""Evaluation throughput once compiled: all 10,000 MNIST test images through `evaluate`.

  python scripts/bench_eval.py --checkpoint ckpt --data-dir ../shared/data/mnist

One warm-up pass compiles; then --repeats timed passes (exact evaluation: loss, confusion matrix,
predictions). Prints the median images/s and the arithmetic rate it implies, and for scale the
rate of a large float32 matrix product on the same devices, about the most arithmetic XLA gets
out of these cores: divided by the CNN's forward FLOPs per image, a ceiling on images/s.

With --stages, also times each stage of the forward pass alone (each conv block, then the dense
layers), one batch per device on all devices at once: which stage falls short of that rate.
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
  parser.add_argument("--batch-size", type=int, default=None,
                      help="default: evaluate's own (EVAL_BATCH_SIZE)")
  parser.add_argument("--stages", action="store_true", help="also time each forward stage")
  args = parser.parse_args()
  from flaxdigits import parallel
  parallel.split_cpu_into_devices()
  import jax
  from flaxdigits.checkpoint import load_model
  from flaxdigits.data import load_mnist
  from flaxdigits.config import EVAL_BATCH_SIZE
  from flaxdigits.evaluation import evaluate
  batch_size = args.batch_size or EVAL_BATCH_SIZE
  model, meta = load_model(args.checkpoint)
  test = load_mnist(args.data_dir, ("test",))["test"]
  evaluate(model, test, batch_size=batch_size)  # compile
  rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    result = evaluate(model, test, batch_size=batch_size)
    rates.append(len(test) / (time.perf_counter() - start))
  flops = sum(_stage_flops(meta["model"]))
  rate = statistics.median(rates)
  matmul = _matmul_flops_per_sec()
  print(f"jax {jax.__version__}, {len(jax.devices())} CPU device(s); accuracy "
        f"{100 * result.accuracy:.2f}%; batches of {batch_size}: median {rate:,.0f} images/s over "
        f"{args.repeats} passes (min {min(rates):,.0f}, max {max(rates):,.0f}); "
        f"{flops / 1e6:.1f} MFLOP/image forward = {rate * flops / 1e9:.0f} GFLOP/s")
  print(f"float32 2048x2048 matrix product on {len(jax.devices())} device(s) at once: "
        f"{matmul / 1e9:.0f} GFLOP/s (best of 10), so at most {matmul / flops:,.0f} images/s at "
        f"that rate")
  if args.stages:
    per_device = batch_size // len(jax.devices())
    for (name, seconds), stage_flops in zip(_stage_seconds(model, per_device, args.repeats),
                                            _stage_flops(meta["model"])):
      images_per_sec = per_device * len(jax.devices()) / seconds
      print(f"  {name:<13} {stage_flops / 1e6:5.2f} MFLOP/image  {images_per_sec:>9,.0f} images/s "
            f" {images_per_sec * stage_flops / 1e9:4.0f} GFLOP/s  {1e3 * seconds:6.1f} ms per "
            f"{per_device} images per device")


def _stage_flops(config: dict) -> list[int]:
  """Forward FLOPs per image (multiply-adds x 2) of each conv block, then of the dense layers."""
  side, c_in, flops = 28, 1, []
  depths = config.get("conv_depths") or [1] * len(config["conv_features"])
  for c_out, depth in zip(config["conv_features"], depths):
    flops.append(2 * side * side * c_out * (c_in + (depth - 1) * c_out) * config["kernel_size"] ** 2)
    side, c_in = side // 2, c_out
  widths = [side * side * c_in] + config["dense_features"] + [config["num_classes"]]
  return flops + [sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))]


def _stage_seconds(model, per_device: int, repeats: int) -> list[tuple[str, float]]:
  """Best time of each forward stage alone on a batch per device, all devices at once."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flaxdigits.model import pool2x2  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)

  def conv_block(layers, state, x):
    m = nnx.merge(graphdef, state)
    for i in layers:
      x = m.convs[i](x)
      x = nnx.relu(m.norms[i](x) if m.norms else x)
    return pool2x2(x, m.config.pool)

  def dense_layers(state, x):
    m = nnx.merge(graphdef, state)
    x = x.reshape(x.shape[0], -1)
    for dense in m.denses:
      x = nnx.relu(dense(x))
    return m.head(x)

  ends = np.cumsum(model.config.block_depths)
  stages = [(f"conv block {b + 1}",
             jax.jit(lambda s, x, layers=range(end - depth, end): conv_block(layers, s, x)))
            for b, (depth, end) in enumerate(zip(model.config.block_depths, ends))]
  stages.append(("dense layers", jax.jit(dense_layers)))
  x = np.random.default_rng(0).random((per_device, 28, 28, 1), np.float32)
  results = []
  for name, stage in stages:
    args = [(jax.device_put(state, d), jax.device_put(x, d)) for d in jax.devices()]
    results.append((name, _best_seconds(stage, args, repeats)))
    x = np.asarray(stage(*args[0]))  # the next stage's input
  return results


def _best_seconds(fn, args_per_device: list[tuple], repeats: int) -> float:
  """Best wall time of fn run on every device's arguments at once, after a compiling call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready([fn(*a) for a in args_per_device])
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready([fn(*a) for a in args_per_device])
    best = min(best, time.perf_counter() - start)
  return best


def _matmul_flops_per_sec(n: int = 2048) -> float:
  """Best rate of an n x n x n float32 product, one per device, all devices at once."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = [(jax.device_put(jnp.ones((n, n), jnp.float32), d),) for d in jax.devices()]
  return len(a) * 2 * n ** 3 / _best_seconds(jax.jit(lambda x: x @ x), a, 10)


if __name__ == "__main__":
  main()
