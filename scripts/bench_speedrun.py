"""Whole cold `digits train` processes side by side, with where each one's time goes.

  python scripts/bench_speedrun.py --data-dir ../shared/data/mnist \\
      [--contenders speedrun,fast,default,flax-example] [--seeds 0 1 2 3 4] \\
      [--once fast,default,flax-example] [--warm [speedrun]] [--against CHECKOUT]

Every run is a fresh process started the way a user starts `digits train --preset NAME`, with
an empty compilation cache (with --warm, each, or each listed, is run again on the cache it
filled); --once runs the listed contenders on the first seed only; --against runs each
`digits` contender also from another checkout (another commit), right after this one's, labelled
[this] and [against]. Runs go round-robin over the contenders, seed by seed, so that drifts in
the machine's speed hit all alike. Each process's time is split into stages, measured inside it:
  imports     from the process's start to the end of importing the CLI, JAX, Flax, Orbax
  data        reading MNIST (and rendering or reading the synthetic non-digits)
  compile     JAX's tracing, lowering and XLA compilation on the main thread, wherever they
              happen, and its waiting for the programs compiled ahead of time on another
              (the "compiled ahead" column: their own seconds, spent beside the stages and not
              part of their sum)
  steps       the training loop itself: the setup, the steps, the host's waiting for them
  evaluation  scoring the held-out and test images (compilation excluded)
  save        checkpoints and inference bundles
  other       the rest: the process's exit, printing
The flax-example contender is the Flax MNIST example's model and loop
(scripts/flax_example_loop.py) for --flax-example-epochs epochs over all 60,000 images, scored on
the test set at the end. Prints one table with the median over seeds of each stage, wall time,
peak memory and test accuracy (mean, std and worst over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _checkout

HERE = Path(__file__).resolve().parent
STAGES = ("imports", "data", "compile", "steps", "evaluation", "save", "other")

# Runs in the child: times its stages (exclusive of what nests inside them), then either runs
# `digits train` itself or the Flax example's loop. Writes its stages as JSON to argv[1].
CHILD = r"""
import collections, json, sys, threading, time
t0 = float(sys.argv[2])
out_path, mode, args = sys.argv[1], sys.argv[3], sys.argv[4:]
spent = collections.defaultdict(float)
ahead = [0.0]
stack = [["imports", time.time()]]

def enter(stage):
  now = time.time()
  spent[stack[-1][0]] += now - stack[-1][1]
  stack.append([stage, now])

def leave():
  now = time.time()
  stage, since = stack.pop()
  spent[stage] += now - since
  stack[-1][1] = now

def on_event(event, duration, **kwargs):
  if event in ("/jax/core/compile/jaxpr_trace_duration",
               "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration"):
    if threading.current_thread() is threading.main_thread():
      spent["compile"] += duration
      spent[stack[-1][0]] -= duration  # it happened inside the current stage
    else:  # compiled ahead of time, beside the main thread's stages: not part of their sum
      ahead[0] += duration

def timed(owner, name, stage):
  inner = getattr(owner, name)
  def wrapper(*a, **k):
    enter(stage)
    try:
      return inner(*a, **k)
    finally:
      leave()
  setattr(owner, name, wrapper)

stack[0][1] = t0
import jax, jax.monitoring
jax.monitoring.register_event_duration_secs_listener(on_event)
from flaxdigits import data, training, checkpoint, evaluation
result = {}
if mode == "digits":
  import flaxdigits.cli.main as cli
  enter("steps")  # the CLI's own setup counts with the loop's
  timed(data, "load_mnist", "data")
  timed(training, "prepare_outliers", "data")
  timed(training, "evaluate", "evaluation")
  if hasattr(training, "_await_compilation"):  # (a checkout from before it compiled ahead)
    timed(training, "_await_compilation", "compile")
  timed(checkpoint.CheckpointManager, "save", "save")
  sys.argv = ["digits", "train", *args]
  try:
    cli.main()
  except SystemExit as e:
    if e.code:
      raise
else:
  sys.path.insert(0, mode)
  from flax_example_loop import FlaxExampleLoop
  enter("data")
  mnist = data.load_mnist(args[0])
  leave()
  enter("steps")
  loop = FlaxExampleLoop(seed=int(args[2]))
  for _ in range(int(args[1])):
    loop.train(mnist["train"].images, mnist["train"].labels)
  leave()
  enter("evaluation")
  result["test_accuracy"] = loop.evaluate(mnist["test"].images, mnist["test"].labels)
  leave()
leave_time = time.time()
spent[stack[-1][0]] += leave_time - stack[-1][1]
result["stages"] = dict(spent)
result["ahead"] = ahead[0]
import resource, flaxdigits
result["module"] = flaxdigits.__file__
result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
json.dump(result, open(out_path, "w"))
"""


def run_one(contender: str, seed: int, args, cache_dir: str, checkout: Path | None = None) -> dict:
  with tempfile.TemporaryDirectory(prefix="flaxdigits-speedrun-") as work:
    stages_path = os.path.join(work, "stages.json")
    env = dict(os.environ, FLAXDIGITS_CACHE_DIR=cache_dir)
    # Another checkout's flaxdigits is imported first, in the imports stage like the rest.
    code = CHILD if checkout is None else (
        _checkout.import_code(repr(str(checkout.resolve()))) + CHILD)
    if contender == "flax-example":
      tail = [str(HERE), args.data_dir, str(args.flax_example_epochs), str(seed)]
    else:
      tail = ["digits", "--preset", contender, "--seed", str(seed), "--data-dir", args.data_dir,
              "--checkpoint", os.path.join(work, "ckpt"), "--json", *args.train_args.split()]
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", code, stages_path, repr(start), *tail],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                             cwd=work, text=True)
    stdout, stderr = child.communicate(timeout=args.timeout)
    wall = time.time() - start
    if child.returncode != 0:
      raise SystemExit(f"{contender} seed {seed} failed:\n{stderr[-3000:]}")
    result = json.load(open(stages_path))
    if checkout is not None and not Path(result["module"]).resolve().is_relative_to(
        checkout.resolve()):
      raise SystemExit(f"the run meant for {checkout} imported {result['module']}")
    if contender != "flax-example":
      result["test_accuracy"] = json.loads(stdout)["test"]["accuracy"]
    stages = result["stages"]
    stages["other"] = wall - sum(stages.values())
    return {"wall": wall, "stages": stages, "ahead": result["ahead"],
            "test_accuracy": result["test_accuracy"], "peak_mb": result["peak_mb"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=os.environ.get("FLAXDIGITS_DATA_DIR"), required=False)
  parser.add_argument("--contenders", default="speedrun,fast,default,flax-example")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--once", default="",
                      help="contenders (comma-separated) run on the first seed only: the slow "
                      "ones, beside a speedrun's five seeds")
  parser.add_argument("--flax-example-epochs", type=int, default=2)
  parser.add_argument("--warm", nargs="?", const="all", default="",
                      help="also run each contender (or those listed, comma-separated) again on "
                      "the compilation cache it filled")
  parser.add_argument("--train-args", default="",
                      help="more `digits train` options for every preset (smoke tests)")
  parser.add_argument("--against", type=Path,
                      help="a checkout of another commit: each `digits` contender runs from it "
                      "too, right after this one")
  parser.add_argument("--timeout", type=float, default=1800)
  args = parser.parse_args()
  if not args.data_dir:
    parser.error("--data-dir (or FLAXDIGITS_DATA_DIR) is needed")
  names = lambda text: [c.strip() for c in text.split(",") if c.strip()]  # noqa: E731
  contenders, once = names(args.contenders), set(names(args.once))
  warm = set(contenders) if args.warm == "all" else set(names(args.warm))
  runs: dict[str, list[dict]] = {}
  with tempfile.TemporaryDirectory(prefix="flaxdigits-speedrun-caches-") as caches:
    for seed in args.seeds:
      for contender in contenders:
        if contender in once and seed != args.seeds[0]:
          continue
        checkouts = [("", None)]
        if args.against is not None and contender != "flax-example":
          checkouts = [(" [this]", None), (" [against]", args.against)]
        for label, checkout in checkouts:
          cache = os.path.join(caches, f"{contender}-{seed}{label}")  # empty: a cold first run
          passes = [("cold", cache)] + [("warm", cache)] * (contender in warm)
          for kind, cache_dir in passes:
            run = run_one(contender, seed, args, cache_dir, checkout)
            name = (f"{contender} ({kind})" if contender in warm else contender) + label
            runs.setdefault(name, []).append(run)
            print(f"{contender}{label} seed {seed} {kind}: {run['wall']:.1f} s, test "
                  f"{100 * run['test_accuracy']:.2f}%, "
                  + ", ".join(f"{s} {run['stages'].get(s, 0):.1f}" for s in STAGES)
                  + f" (compiled ahead, beside them: {run['ahead']:.1f})", flush=True)
  print()
  header = ["contender", "wall s", *STAGES, "compiled ahead", "peak MB",
            "test acc: mean ± std (worst)"]
  print(" | ".join(header))
  for name, done in runs.items():
    median = lambda values: statistics.median(values)  # noqa: E731
    accuracy = [100 * r["test_accuracy"] for r in done]
    spread = f" ± {statistics.stdev(accuracy):.2f}" if len(done) > 1 else ""
    peak = [r["peak_mb"] for r in done]
    print(" | ".join([name, f"{median([r['wall'] for r in done]):.1f}",
                      *(f"{median([r['stages'].get(s, 0.0) for r in done]):.1f}" for s in STAGES),
                      f"{median([r['ahead'] for r in done]):.1f}",
                      f"{max(peak):.0f}",
                      f"{statistics.mean(accuracy):.2f}%{spread} ({min(accuracy):.2f}%)"]))


if __name__ == "__main__":
  main()
