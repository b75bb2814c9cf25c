import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flaxdigits.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_ckpt(tiny_data_dir, tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("cli") / "ckpt"
  result = runner.invoke(app, ["train", "--epochs", "1", "--batch-size", "64", "--validation",
                               "0", "--data-dir", str(tiny_data_dir), "--checkpoint", str(ckpt),
                               "--json"])
  assert result.exit_code == 0, result.output
  return ckpt, json.loads(result.stdout)


def test_train_json_reports_history_and_test_metrics(trained_ckpt):
  ckpt, out = trained_ckpt
  assert out["step"] == 8 and len(out["history"]) == 1
  assert out["test"]["num_examples"] == 300
  assert (ckpt / "8").is_dir()


def test_eval_needs_only_the_checkpoint(trained_ckpt, tiny_data_dir):
  ckpt, trained = trained_ckpt
  result = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--data-dir",
                               str(tiny_data_dir), "--json"])
  assert result.exit_code == 0, result.output
  out = json.loads(result.stdout)
  assert out["num_examples"] == 300 and sum(map(sum, out["confusion_matrix"])) == 300
  assert len(out["confusion_matrix"]) == 10 and all(len(r) == 10 for r in out["confusion_matrix"])
  assert out["accuracy"] == pytest.approx(trained["test"]["accuracy"])
  assert out["loss"] == pytest.approx(trained["test"]["loss"], rel=1e-5)


def test_eval_table_shows_accuracy_and_confusion_matrix(trained_ckpt, tiny_data_dir):
  ckpt, trained = trained_ckpt
  result = runner.invoke(app, ["eval", "-c", str(ckpt), "--data-dir", str(tiny_data_dir)],
                         env={"COLUMNS": "120"})
  assert result.exit_code == 0, result.output
  assert "Confusion matrix" in result.stdout
  assert f"{100 * trained['test']['accuracy']:.2f}%" in result.stdout


def test_train_refuses_to_overwrite_and_resume_extends(trained_ckpt, tiny_data_dir):
  ckpt, _ = trained_ckpt
  args = ["train", "--batch-size", "64", "--validation", "0", "--data-dir", str(tiny_data_dir),
          "--checkpoint", str(ckpt), "--quiet"]
  refused = runner.invoke(app, args + ["--epochs", "2"])
  assert refused.exit_code == 1
  assert "already holds a checkpoint" in refused.stderr and "Traceback" not in refused.output
  other_split = runner.invoke(app, ["train", "--data-dir", str(tiny_data_dir), "--checkpoint",
                                    str(ckpt), "--resume", "--validation", "64"])
  assert other_split.exit_code == 1
  assert "trained with validation=0, not 64" in other_split.stderr
  resumed = runner.invoke(app, ["train", "--data-dir", str(tiny_data_dir), "--checkpoint",
                               str(ckpt), "--resume", "--epochs", "2", "--validation", "0",
                               "--json"])
  assert resumed.exit_code == 0, resumed.output
  out = json.loads(resumed.stdout)
  assert out["step"] == 16 and [h["epoch"] for h in out["history"]] == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["eval", "--checkpoint", "/nonexistent/ckpt"], "checkpoint directory not found"),
    (["train", "--data-dir", "/nonexistent/mnist", "--checkpoint", "{tmp}/c"],
     "MNIST data folder not found"),
    (["train", "--epochs", "0", "--checkpoint", "{tmp}/c"], "epochs must be in [1, 10000], got 0"),
    (["train", "--epochs", "99999999999", "--checkpoint", "{tmp}/c"],
     "epochs must be in [1, 10000], got 99999999999"),
    (["train", "--seed", str(2**64), "--checkpoint", "{tmp}/c"], "seed must be in [0, 2**32 - 1]"),
    (["train", "--checkpoint", "{tmp}/a-file"], "a-file is a file, not a folder"),
    (["train", "--resume", "--checkpoint", "{tmp}/a-file"], "checkpoint directory not found"),
    (["train", "--resume", "--checkpoint", "{tmp}/none"], "not found"),
    (["train", "--dropout", "1.5", "--checkpoint", "{tmp}/c"],
     "dropout must be a rate in [0, 1), got 1.5"),
])
def test_errors_are_one_line_on_stderr(args, message, tmp_path):
  (tmp_path / "a-file").write_text("not a folder")
  result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
  assert result.exit_code == 1
  assert message in result.stderr
  assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, option", [
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--cpu-devices", "-1"], "--cpu-devices"),
    (["serve", "--max-upload-mb", "-1"], "--max-upload-mb"),
    (["eval", "--cpu-devices", "100000"], "--cpu-devices"),
])
def test_out_of_range_options_are_usage_errors(args, option, tmp_path):
  # Refused by the command line before anything loads (eval once crashed on --batch-size 0).
  result = runner.invoke(app, args + ["--checkpoint", str(tmp_path / "none")])
  assert result.exit_code == 2
  assert option in result.stderr and "Traceback" not in result.output


def test_help_does_not_import_jax():
  code = ("import sys\nfrom flaxdigits.cli.main import main\nsys.argv = ['digits', '--help']\n"
          "try:\n  main()\nexcept SystemExit as e:\n  assert e.code == 0, e.code\n"
          "bad = [m for m in ('jax', 'flax', 'tensorflow', 'orbax') if m in sys.modules]\n"
          "assert not bad, bad\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  assert "train" in result.stdout and "eval" in result.stdout


@pytest.mark.parametrize("command, default", [
    ("train", "[default: 5; presets: fast 2, best 15, speedrun 1]"), ("train", "[default: 128]"),
    ("serve", "[default: one per core]"), ("export", "[default: digits.onnx or digits.tflite]")])
def test_help_shows_defaults_written_by_hand(command, default):
  # Rich read "[default: 128]" as a style tag and dropped it from the help.
  result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
  assert result.exit_code == 0 and default in result.stdout


@pytest.mark.slow  # a whole digits process
def test_ctrl_c_saves_checkpoint_and_exits_130(tiny_data_dir, tmp_path):
  import os
  import signal
  import time
  ckpt = tmp_path / "ckpt"
  env = os.environ | {"FLAXDIGITS_DATA_DIR": str(tiny_data_dir)}
  proc = subprocess.Popen(
      [sys.executable, "-c", "from flaxdigits.cli.main import main; main()", "train",
       "--epochs", "10000", "--batch-size", "64", "--validation", "64", "--checkpoint", str(ckpt),
       "--quiet"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.monotonic() + 120
  while not any(p.name.isdigit() for p in ckpt.glob("*")) and time.monotonic() < deadline:
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "interrupted" in err and "--resume" in err and "Traceback" not in err
  from flaxdigits.checkpoint import CheckpointManager
  assert CheckpointManager(ckpt).latest_step() >= 7  # 448 images: 7 steps an epoch


def test_eval_report_tables_json_and_figures(trained_ckpt, tiny_data_dir, tmp_path):
  ckpt, _ = trained_ckpt
  result = runner.invoke(app, ["eval", "-c", str(ckpt), "--data-dir", str(tiny_data_dir),
                               "--report", str(tmp_path / "report"), "--json"])
  assert result.exit_code == 0, result.output
  out = json.loads(result.stdout)
  assert [r["digit"] for r in out["per_class"]] == list(range(10))
  cm = out["confusion_matrix"]
  for r in out["per_class"]:
    assert r["support"] == sum(cm[r["digit"]])
  for pair in out["most_confused"]:
    assert cm[pair["true"]][pair["predicted"]] == pair["count"]
    assert pair["true"] != pair["predicted"]
  names = sorted(p.name for p in (tmp_path / "report").iterdir())
  assert names == ["confusion_matrix.png", "misclassified.png", "reliability.png",
                   "training_curves.png"]
  from PIL import Image
  with Image.open(tmp_path / "report" / "confusion_matrix.png") as image:
    assert image.format == "PNG" and image.size == (1400, 650)
  table = runner.invoke(app, ["eval", "-c", str(ckpt), "--data-dir", str(tiny_data_dir),
                              "--report", str(tmp_path / "report2"), "--tta"],
                        env={"COLUMNS": "120"})
  assert table.exit_code == 0, table.output
  assert "Per-class metrics" in table.stdout and "Most confused pairs" in table.stdout
  assert "with test-time augmentation" in table.stdout


def test_preset_sets_the_recipe_and_options_override_it(tiny_data_dir, tmp_path):
  from flaxdigits.checkpoint import CheckpointManager
  ckpt = tmp_path / "fast"
  result = runner.invoke(app, ["train", "--preset", "fast", "--epochs", "1", "--batch-size", "64",
                               "--validation", "0", "--data-dir", str(tiny_data_dir),
                               "--checkpoint", str(ckpt), "--quiet"])
  assert result.exit_code == 0, result.output
  meta = CheckpointManager(ckpt, read_only=True).read_meta()
  assert meta["model"]["conv_features"] == [16, 32] and meta["model"]["dense_features"] == [128]
  assert meta["train"]["batch_size"] == 64 and meta["train"]["epochs"] == 1  # given: kept
  assert meta["train"]["learning_rate"] == 4e-2 and meta["train"]["max_shift"] == 1  # preset
  resumed = runner.invoke(app, ["train", "--resume", "--preset", "fast", "--data-dir",
                                str(tiny_data_dir), "--checkpoint", str(ckpt)])
  assert resumed.exit_code == 1 and "drop --preset" in resumed.stderr


def test_norm_and_dropout_options_shape_the_model(tiny_data_dir, tmp_path):
  from flaxdigits.checkpoint import CheckpointManager, load_model
  ckpt = tmp_path / "bn"
  result = runner.invoke(app, ["train", "--epochs", "1", "--batch-size", "64", "--validation",
                               "0", "--norm", "batch", "--dropout", "0.2", "--data-dir",
                               str(tiny_data_dir), "--checkpoint", str(ckpt), "--quiet"])
  assert result.exit_code == 0, result.output
  meta = CheckpointManager(ckpt, read_only=True).read_meta()
  assert meta["model"]["norm"] == "batch" and meta["model"]["dropout"] == 0.2
  assert meta["model"]["conv_features"] == [32, 64]  # the default preset's, otherwise
  model, _ = load_model(ckpt)
  assert len(model.norms) == 2
  resumed = runner.invoke(app, ["train", "--resume", "--dropout", "0.1", "--data-dir",
                                str(tiny_data_dir), "--checkpoint", str(ckpt)])
  assert resumed.exit_code == 1 and "drop --dropout" in resumed.stderr
