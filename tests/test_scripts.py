"""Every script in scripts/ runs, on tiny settings: the committed MNIST slice, a narrow CNN, a few
steps. Speed is measured by these scripts, never asserted here; this only proves they run (the
README's main speed command once crashed with nothing noticing)."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(script: str, *args: str, timeout: float = 300) -> str:
  done = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)],
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  return done.stdout


@pytest.fixture(scope="module")
def digit_png(small, tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("png") / "digit.png"
  Image.fromarray(255 - small["test"].images[0]).resize((112, 112)).save(path)
  return path


def test_every_script_has_a_smoke_test():
  tested = {"bench_cold.py", "bench_eval.py", "bench_hostile.py", "bench_predict.py",
            "bench_preprocess.py", "bench_startup.py", "bench_train.py", "benchmark.py",
            "check_export.py", "compare_ood.py", "compare_tta.py", "load_test.py",
            "make_realistic_set.py", "make_doc_figures.py", "sweep.py", "bench_speedrun.py",
            "flax_example_loop.py", "bench_multihost.py", "gpu_check.py",
            "compare_pad_side.py", "compare_stroke_width.py"}  # a module benchmark.py and bench_train.py run
  assert {p.name for p in SCRIPTS.glob("*.py") if not p.name.startswith("_")} == tested


def test_bench_startup():
  assert "digits --help" in run("bench_startup.py", "--runs", 2)


def test_bench_cold(tiny_checkpoint, tiny_data_dir, digit_png):
  out = run("bench_cold.py", "--checkpoint", tiny_checkpoint, "--image", digit_png,
            "--data-dir", tiny_data_dir, "--runs", 1, "--only", "eval", "eda")
  assert "eval" in out and "eda" in out and "predict" not in out
  out = run("bench_cold.py", "--checkpoint", tiny_checkpoint, "--image", digit_png,
            "--data-dir", tiny_data_dir, "--runs", 1, "--only", "predict", "--against",
            SCRIPTS.parent, "--against-checkpoint", tiny_checkpoint)
  assert "[this]" in out and "[against]" in out


def test_bench_hostile():
  out = run("bench_hostile.py", "--runs", 1, "--scale", 0.02)
  for case in ("png-bomb", "png-largest", "jpeg-12mp", "idx-gzip-bomb", "train-into-file"):
    assert f"{case} " in out
  assert "failed" not in out and "killed" not in out and "exit 1" in out


def test_bench_eval(tiny_checkpoint, tiny_data_dir):
  out = run("bench_eval.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--repeats", 1, "--stages")
  assert "images/s" in out


def test_make_realistic_set_and_bench_predict(tiny_checkpoint, tiny_data_dir, tmp_path):
  run("make_realistic_set.py", "--data-dir", tiny_data_dir, "--out", tmp_path / "set",
      "--per-kind", 2, "--phone", 1)
  assert len(list((tmp_path / "set").rglob("*.*"))) == 6 * 2 + 1
  [phone] = (tmp_path / "set" / "phone").iterdir()
  assert max(Image.open(phone).size) >= 3000
  out = run("bench_predict.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--set", tmp_path / "set")
  assert "overall" in out.lower() and "clean MNIST test accuracy" in out
  out = run("bench_predict.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--set", tmp_path / "set", "--clean", "validation")  # its 64 held-out images
  assert "clean MNIST validation accuracy" in out and "overall" in out
  out = run("compare_ood.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--outliers", 12, "--noise", 20, "--realistic", tmp_path / "set", "--json")
  figures = json.loads(out.splitlines()[-1])
  assert set(figures["choice"]) == {"max_probability", "energy", "max_logit"}
  assert figures["outliers"]["count"] == 12 and 0 <= figures["noise"]["rejected"] <= 1
  assert figures["realistic"]["count"] == 13


def test_make_doc_figures(tiny_data_dir, tmp_path):
  out = run("make_doc_figures.py", "--data-dir", tiny_data_dir, "--out", tmp_path)
  figure = Image.open(tmp_path / "preprocessing_stages.png")
  assert "preprocessing_stages.png" in out and figure.size[0] >= 800


def test_bench_train(tiny_data_dir):
  out = run("bench_train.py", "--data-dir", tiny_data_dir, "--short", 2, "--long", 4,
            "--repeats", 1, "--only", "(default)")  # the baseline and one contender: a smoke test
  assert out.count("img/s") == 2 and "(default)" in out and "speed-up of" in out
  # Two extra steps may measure only noise: then no rate, never a negative one.
  assert not re.search(r"-\d+ img/s|: -\d", out), out


def test_benchmark(tiny_data_dir, tmp_path):
  run("benchmark.py", "--data-dir", tiny_data_dir, "--epochs", 2, "--repeats", 1, "--only",
      "flaxdigits,flax-example,flax-example-eigen", "--json", tmp_path / "b.json", timeout=600)
  medians = json.loads((tmp_path / "b.json").read_text())["medians"]
  assert set(medians) >= {"flaxdigits", "flax-example"}
  for name, row in medians.items():  # the steady speed comes from the second epoch
    assert row["epochs"] == 2 and row["images_per_sec"] > 0 and row["epoch_seconds"] > 0, name


def test_check_export(tiny_checkpoint, tiny_data_dir, tmp_path):
  pytest.importorskip("jax2onnx", reason="needs the export extra")
  out = run("check_export.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--out", tmp_path / "exports")
  # The tiny checkpoint is calibrated (a temperature far from 1): the runtimes must agree with
  # JAX at that temperature, as the exports compute.
  for fmt in ("onnx", "tflite"):
    line = next(line for line in out.splitlines() if line.startswith(fmt))
    assert "top-1 agreement 100.00%" in line
    assert float(re.search(r"max \|dp\| (\S+);", line).group(1)) < 1e-4, line


def test_bench_speedrun_splits_each_process_into_stages(tiny_data_dir):
  out = run("bench_speedrun.py", "--data-dir", tiny_data_dir, "--contenders",
            "speedrun,flax-example", "--seeds", 0, 1, "--once", "speedrun,flax-example",
            "--flax-example-epochs", 1, "--train-args", "--batch-size 64 --validation 64",
            "--against", SCRIPTS.parent)
  rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if " | " in line}
  assert set(rows) == {"contender", "speedrun [this]", "speedrun [against]", "flax-example"}
  assert out.count("speedrun [this] seed") == 1 and out.count("flax-example seed") == 1  # --once
  for name in ("speedrun [this]", "speedrun [against]", "flax-example"):
    wall, *stages = map(float, rows[name][1:9])
    assert abs(sum(stages) - wall) < 0.5 and stages[0] > 0 and stages[2] > 0, name  # 8 roundings
    assert rows[name][-1].endswith("%)")


def test_sweep_compares_settings_on_held_out_images(tiny_data_dir):
  out = run("sweep.py", "--preset", "fast", "--data-dir", tiny_data_dir, "--train-subset", 400,
            "--set", "validation=100", "--set", "epochs=1", "--set", "batch_size=64",
            "--set", "outlier_exposure=0", "--grid", "learning_rate=1e-3,1e-2",
            "--grid", "conv_features=8/16", "--seeds", 0, 1)
  table = out.split("best first")[1]
  assert "{'learning_rate': 0.001, 'conv_features': (8, 16)}" in table
  assert "{'learning_rate': 0.01, 'conv_features': (8, 16)}" in table
  assert out.count("seed 0: held-out") == out.count("seed 1: held-out") == 2  # 2 settings
  assert "100 held-out images" in out


def test_sweep_keeps_each_runs_checkpoint_for_the_held_out_scripts(tiny_data_dir, tmp_path):
  run("sweep.py", "--preset", "fast", "--data-dir", tiny_data_dir, "--train-subset", 300,
      "--set", "validation=64", "--set", "epochs=1", "--set", "batch_size=64",
      "--set", "outlier_exposure=0", "--grid", "conv_features=8/16", "--seeds", 0, 1,
      "--checkpoint-dir", tmp_path)
  kept = sorted(p.name for p in tmp_path.iterdir())
  assert kept == ["conv_features=8-16-seed0", "conv_features=8-16-seed1"]
  out = run("compare_tta.py", "--checkpoint", *(tmp_path / k for k in kept), "--data-dir",
            tiny_data_dir, "--ensemble")
  assert "64 held-out images x 2 checkpoint(s): single models pooled, then the ensemble" in out
  assert out.count("ensemble ") == 9  # every view set, scored on the pair as one model too


def test_compare_tta_chooses_on_held_out_images(tiny_checkpoint, tiny_data_dir):
  out = run("compare_tta.py", "--checkpoint", tiny_checkpoint, tiny_checkpoint, "--data-dir",
            tiny_data_dir)
  assert "64 held-out images x 2 checkpoint(s)" in out  # the checkpoint's --validation 64
  assert out.count("best on held-out images") == 1 and "digits eval --tta" in out


@pytest.mark.parametrize("kind", ["pad", "photo"])
def test_load_test(tiny_checkpoint, tiny_data_dir, kind):
  pytest.importorskip("uvicorn", reason="needs the serve extra")
  out = run("load_test.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--kind", kind, "--clients", 2, "--requests", 10, "--max-seconds", 120,
            *(["--against", SCRIPTS.parent, "--against-checkpoint", tiny_checkpoint]
              if kind == "pad" else []))
  assert out.count("requests/s") == (2 if kind == "pad" else 1) and "statuses 200: 10" in out


def test_bench_preprocess(tiny_data_dir):
  out = run("bench_preprocess.py", "--data-dir", tiny_data_dir, "--count", 1, "--rounds", 1,
            "--repeats", 1, "--against", SCRIPTS.parent)
  assert "median over rounds, this" in out and "median over rounds, against" in out


def test_compare_pad_side_uses_held_out_digits(tiny_checkpoint, tiny_data_dir):
  out = run("compare_pad_side.py", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_data_dir,
            "--sides", "160,112", "--count", 20, "--timing-count", 5, "--rounds", 1)
  assert "20 held-out training digits" in out
  assert re.search(r"side  112 px: \d+\.\d\d% correct", out)
  assert re.search(r"side  160 px: to_mnist \d+\.\d\d ms", out)


def test_compare_stroke_width_uses_held_out_digits(tiny_checkpoint, tiny_data_dir, tmp_path):
  kind = tmp_path / "set" / "scan"  # a realistic set of one kind, two pictures
  kind.mkdir(parents=True)
  for i, label in enumerate((3, 7)):
    ink = np.zeros((60, 60), np.uint8)
    ink[10:50, 25 + i * 5:33 + i * 5] = 255
    Image.fromarray(255 - ink).save(kind / f"{i:05d}_{label}.png")
  out = run("compare_stroke_width.py", "--checkpoint", tiny_checkpoint, "--data-dir",
            tiny_data_dir, "--count", 20, "--set", tmp_path / "set")
  assert re.search(r"pad-112 +area/edge \(now\) +\d+\.\d\d% \(\d+/20\)  spine \(before\)", out)
  assert re.search(r"scan +area/edge \(now\) +\d+\.\d\d% \(\d/2\).*same decision", out)
  assert re.search(r"overall .*\(\d+/22\)", out)
  assert re.search(r"spine \(before\): \d+ us per estimate", out)


def test_checkout_runs_a_checkouts_own_cli():
  # scripts/_checkout.py: how the side-by-side benchmarks run another commit's code.
  sys.path.insert(0, str(SCRIPTS))
  try:
    import _checkout
  finally:
    sys.path.remove(str(SCRIPTS))
  done = subprocess.run([*_checkout.digits(SCRIPTS.parent), "--help"], capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0 and "train" in done.stdout and "serve" in done.stdout


def test_bench_multihost(tiny_data_dir):
  out = run("bench_multihost.py", "--data-dir", tiny_data_dir, "--batch-size", 64,
            "--validation", 64)
  assert "| 1 process x 4 devices |" in out and "| 2 processes x 2 devices |" in out
  assert "wall time" in out


def test_gpu_check_runs_its_steps_on_cpu(tiny_data_dir):
  out = run("gpu_check.py", "--data-dir", tiny_data_dir, "--validation", 64)
  assert "the bundle on the CPU" in out and "all checks passed" in out
