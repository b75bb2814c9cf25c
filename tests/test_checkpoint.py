import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from flaxdigits.checkpoint import (
  MAX_TO_KEEP,
  CheckpointManager,
  check_writable,
  load_model,
  refuse_existing,
)
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.evaluation import evaluate
from flaxdigits.training import train

TINY = ModelConfig(conv_features=(8,), dense_features=(32,))


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
  directory = tmp_path_factory.mktemp("ckpt")
  config = TrainConfig(epochs=5, batch_size=128, seed=4, validation=0, outlier_exposure=0.0)
  return directory, train(small, TINY, config, checkpoint_dir=str(directory)), config


def test_restore_equals_save(trained, small):
  directory, result, _ = trained
  model, meta = load_model(directory)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(result.state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert evaluate(model, small["test"]).accuracy == result.test.accuracy


def test_checkpoint_carries_config_and_history(trained):
  directory, result, config = trained
  _, meta = load_model(directory)
  assert ModelConfig.from_dict(meta["model"]) == TINY
  assert TrainConfig.from_dict(meta["train"]) == config
  assert meta["step"] == 5 * 4 and meta["history"] == json.loads(json.dumps(result.history))
  assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4, 5]


def test_keeps_only_the_latest_few(trained):
  directory, _, _ = trained
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert steps == [12, 16, 20][-MAX_TO_KEEP:]


def test_older_step_can_be_loaded(trained):
  directory, result, _ = trained
  model, meta = load_model(directory, step=12)
  assert meta["step"] == 12 and meta["history"][-1]["epoch"] == 3
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
    load_model(directory, step=4)


def test_missing_checkpoint_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
    load_model(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    load_model(tmp_path)


@pytest.mark.parametrize("check", [refuse_existing, check_writable])
def test_a_folder_another_process_creates_meanwhile_is_not_taken_for_a_file(
    check, tmp_path, monkeypatch):
  """The processes of a job check the same folder while one of them creates it (a CI failure):
  here the folder appears right after the first question about it, whichever that is."""
  target = tmp_path / "ckpt"
  asked = []

  def racing(name):
    real = getattr(Path, name)

    def query(self, *args, **kwargs):
      if self == target and not asked:
        asked.append(name)
        answer = real(self, *args, **kwargs)  # before the other process's mkdir
        target.mkdir()
        return answer
      return real(self, *args, **kwargs)
    return query

  for name in ("exists", "is_dir"):
    monkeypatch.setattr(Path, name, racing(name))
  check(target)
  assert asked and target.is_dir()


@pytest.fixture
def copy(trained, tmp_path):
  """A copy of the trained checkpoint folder, free to damage."""
  return shutil.copytree(trained[0], tmp_path / "copy")


def test_checkpoint_of_other_format_is_refused(copy):
  for meta_file in copy.glob("*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta["format"] = 99
    meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="format 99"):
    load_model(copy)


def test_unfinished_save_is_never_the_latest(copy):
  # What an interrupted Orbax save leaves behind: a temporary folder for a later step.
  shutil.copytree(copy / "20", copy / "24.orbax-checkpoint-tmp-1234")
  assert CheckpointManager(copy).latest_step() == 20
  assert load_model(copy)[1]["step"] == 20


def test_loads_on_another_device_count(trained):
  """Trained on 4 devices here; loading in a 1-device process must work too."""
  import os
  import subprocess
  import sys
  directory, result, _ = trained
  code = ("import jax, sys\nfrom flaxdigits.checkpoint import load_model\n"
          "model, meta = load_model(sys.argv[1])\n"
          "print(len(jax.devices()), meta['step'], float(model.head.bias[...].sum()))\n")
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True,
                       text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  devices, step, bias_sum = out.stdout.split()
  assert (devices, step) == ("1", "20")
  assert float(bias_sum) == pytest.approx(float(result.state.params["head"]["bias"][...].sum()))
