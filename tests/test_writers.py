"""Training's writers: what `train` reports, and TensorBoard event files read back with
TensorBoard's own reader."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flaxdigits import training as train_lib
from flaxdigits.cli.main import app
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.writers import (InMemoryWriter, MetricWriter, MultiWriter, TensorBoardWriter,
                                periodic)

TINY = ModelConfig(conv_features=(8,), dense_features=(32,))


def read_events(logdir: Path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
  events.Reload()
  scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
             for tag in events.Tags()["scalars"]}
  texts = {tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
           for tag in events.Tags()["tensors"]}
  return scalars, texts


def test_train_writes_every_epoch_and_the_running_figures(small, tmp_path):
  memory = InMemoryWriter()
  config = TrainConfig(epochs=2, batch_size=64, steps_per_dispatch=2, validation=128,
                       outlier_exposure=0.0)
  with TensorBoardWriter(tmp_path / "logs", every_steps=3) as board:
    result = train_lib.train(small, TINY, config, writer=MultiWriter([memory, board]))
  steps_per_epoch = (512 - 128) // 64  # 6

  assert memory.hparams["steps_per_epoch"] == steps_per_epoch
  assert memory.hparams["total_steps"] == 12 and memory.hparams["start_step"] == 0
  assert memory.hparams["train.validation"] == 128 and memory.hparams["model.conv_features"] == (8,)
  running = [(step, s) for step, s in memory.scalars if periodic(s)]
  epochs = [(step, s) for step, s in memory.scalars if not periodic(s)]
  # Every dispatch but each epoch's last reports its running figures (2 steps a dispatch).
  assert [step for step, _ in running] == [2, 4, 8, 10]
  schedule = train_lib.learning_rate_schedule(config, steps_per_epoch)
  for step, scalars in running:  # the rate of the last step taken
    assert scalars["train/learning_rate"] == pytest.approx(float(schedule(step - 1)), rel=1e-6)
    assert 0 <= scalars["train/accuracy"] <= 1 and scalars["train/loss"] > 0
  assert [step for step, _ in epochs] == [6, 12]
  for (step, scalars), record in zip(epochs, result.history, strict=True):
    assert scalars["epoch"] == record["epoch"] and step == record["step"]
    assert scalars["validation/accuracy"] == record["validation_accuracy"]
    assert scalars["epoch/train_loss"] == record["train_loss"]
  assert "test/accuracy" not in epochs[0][1]  # the test set waits for the end
  assert epochs[1][1]["test/accuracy"] == result.test.accuracy

  scalars, texts = read_events(tmp_path / "logs")
  # Epoch scalars all; running ones thinned to at least every_steps apart.
  assert [step for step, _ in scalars["validation/accuracy"]] == [6, 12]
  assert scalars["test/accuracy"] == [(12, pytest.approx(result.test.accuracy, rel=1e-6))]
  assert [step for step, _ in scalars["train/loss"]] == [2, 8]
  assert scalars["epoch/train_loss"][0][1] == pytest.approx(result.history[0]["train_loss"],
                                                            rel=1e-6)
  assert "train.learning_rate" in texts["hparams/text_summary"][0]


def test_cli_logdir_writes_what_json_reports(tiny_data_dir, tmp_path):
  logdir = tmp_path / "runs" / "one"
  result = CliRunner().invoke(app, [
      "train", "--preset", "fast", "--epochs", "2", "--batch-size", "64", "--validation", "64",
      "--data-dir", str(tiny_data_dir), "--checkpoint", str(tmp_path / "ckpt"), "--json",
      "--logdir", str(logdir), "--log-every", "1"])
  assert result.exit_code == 0, result.output
  history = json.loads(result.stdout)["history"]
  scalars, _ = read_events(logdir)
  for tag, key in [("validation/accuracy", "validation_accuracy"), ("epoch/seconds", "seconds"),
                   ("validation/temperature", "temperature"), ("test/loss", "test_loss")]:
    assert [v for _, v in scalars[tag]][-1] == pytest.approx(history[-1][key], rel=1e-6), tag
  assert len(scalars["train/images_per_second"]) >= 2  # every dispatch once measurable
  assert len(scalars["train/learning_rate"]) >= 4


def test_an_unwritable_logdir_fails_before_training(tiny_data_dir, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  result = CliRunner().invoke(app, [
      "train", "--data-dir", str(tiny_data_dir), "--checkpoint", str(tmp_path / "ckpt"),
      "--logdir", str(tmp_path / "file" / "logs")])
  assert result.exit_code != 0
  assert "log directory" in result.stderr and "Traceback" not in result.output
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "ckpt").exists()


def test_writer_interface_defaults_and_fan_out():
  class OnlyScalars(MetricWriter):
    def __init__(self):
      self.seen = []

    def write_scalars(self, step, scalars):
      self.seen.append((step, dict(scalars)))

  plain, memory = OnlyScalars(), InMemoryWriter()
  with MultiWriter([plain, memory]) as both:
    both.write_hparams({"a": 1})
    both.write_texts(0, {"note": "hello"})
    both.write_scalars(3, {"train/loss": 0.5})
  assert plain.seen == memory.scalars == [(3, {"train/loss": 0.5})]
  assert memory.hparams == {"a": 1} and memory.texts == [(0, {"note": "hello"})]
  with pytest.raises(ValueError, match="every_steps"):
    TensorBoardWriter("unused", every_steps=0)
