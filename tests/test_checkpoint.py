import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from flaxdigits.checkpoint import MAX_TO_KEEP, CheckpointManager, load_model
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.evaluate import evaluate
from flaxdigits.train import train

TINY = ModelConfig(conv_features=(8,), dense_features=(32,))


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
  directory = tmp_path_factory.mktemp("ckpt")
  config = TrainConfig(epochs=5, batch_size=128, seed=4)
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
