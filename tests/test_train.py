import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from flaxdigits import training as train_lib
from flaxdigits.checkpoint import CheckpointManager, load_model
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.data import Split
from flaxdigits.parallel import make_mesh
from flaxdigits.writers import InMemoryWriter, periodic

TINY = ModelConfig(conv_features=(8,), dense_features=(32,))


class OnScalars(InMemoryWriter):
  """Calls `act(step, scalars)` on every write_scalars, as a user's writer might."""

  def __init__(self, act):
    super().__init__()
    self.act = act

  def write_scalars(self, step, scalars):
    super().write_scalars(step, scalars)
    self.act(step, scalars)


def tiny_train(data, mesh=None, **kwargs):
  # The loop's mechanics on every image, as before held-out images and outliers existed
  # (test_calibration.py covers those).
  options = dict(epochs=2, batch_size=64, learning_rate=3e-3, seed=0, steps_per_dispatch=2,
                 validation=0, outlier_exposure=0.0)
  checkpoint_dir = kwargs.pop("checkpoint_dir", None)
  resume = kwargs.pop("resume", False)
  stop_at_step = kwargs.pop("stop_at_step", None)
  writer = kwargs.pop("writer", None)
  model = kwargs.pop("model", TINY)
  config = TrainConfig(**(options | kwargs))
  return train_lib.train(data, model, config, mesh=mesh, checkpoint_dir=checkpoint_dir,
                         resume=resume, stop_at_step=stop_at_step, writer=writer)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_pinned_first_step_loss(small):
  writer = InMemoryWriter()
  result = tiny_train(small, epochs=1, steps_per_dispatch=1, mesh=make_mesh(jax.devices()[:1]),
                      writer=writer)
  step, first = writer.scalars[0]
  # Mean loss of the first 64-image step of this seed/config: pinned to catch silent changes to
  # initialisation, preprocessing, shuffling or the loss.
  assert step == 1
  assert first["train/loss"] == pytest.approx(2.31214, abs=5e-4)  # 2.29912 before the affine warp
  assert result.history[0]["step"] == 8


def test_same_seed_gives_bit_identical_parameters(small):
  a, b = tiny_train(small), tiny_train(small)
  assert_trees_equal(a.state.params, b.state.params)
  c = tiny_train(small, seed=1)
  assert not np.array_equal(leaves(a.state.params)[0], leaves(c.state.params)[0])


def test_dropout_is_seeded_and_changes_training(small):
  dropped = ModelConfig(conv_features=(8,), dense_features=(32,), dropout=0.3)
  a, b = (tiny_train(small, epochs=1, model=dropped) for _ in range(2))
  assert_trees_equal(a.state.params, b.state.params)
  plain = tiny_train(small, epochs=1)
  assert not np.array_equal(leaves(a.state.params)[-1], leaves(plain.state.params)[-1])


def test_sharded_matches_single_device(small):
  assert len(jax.devices()) == 4
  one = tiny_train(small, mesh=make_mesh(jax.devices()[:1]))
  four = tiny_train(small, mesh=make_mesh(jax.devices()))
  for x, y in zip(leaves(one.state.params), leaves(four.state.params), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
  assert one.history[-1]["test_accuracy"] == pytest.approx(four.history[-1]["test_accuracy"],
                                                           abs=0.01)


def test_overfits_one_batch_to_full_accuracy(small):
  batch = {"train": Split(small["train"].images[:64], small["train"].labels[:64])}
  batch["test"] = batch["train"]
  result = tiny_train(batch, epochs=60, learning_rate=1e-2, steps_per_dispatch=1, max_shift=0,
                      label_smoothing=0.0)
  assert result.history[-1]["train_accuracy"] == 1.0
  assert result.test.accuracy == 1.0


def test_learns_beyond_chance(small):
  result = tiny_train(small, epochs=4)
  assert result.history[-1]["test_accuracy"] > 0.6
  assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("stop_at_step", [8, 5 * 2])
def test_resume_continues_to_the_identical_parameters(small, tmp_path, stop_at_step):
  straight = tiny_train(small)
  partial = tiny_train(small, checkpoint_dir=tmp_path, stop_at_step=stop_at_step)
  assert int(partial.state.step) == stop_at_step
  assert CheckpointManager(tmp_path).latest_step() == stop_at_step
  resumed = tiny_train(small, checkpoint_dir=tmp_path, resume=True)
  assert int(resumed.state.step) == 16
  assert_trees_equal(straight.state.params, resumed.state.params)
  assert_trees_equal(straight.state.opt_state, resumed.state.opt_state)
  assert [h["epoch"] for h in resumed.history] == [1, 2]


BATCH_NORM = ModelConfig(conv_features=(8,), dense_features=(32,), norm="batch")


def test_batch_norm_resumes_to_the_identical_state(small, tmp_path):
  straight = tiny_train(small, model=BATCH_NORM)
  tiny_train(small, model=BATCH_NORM, checkpoint_dir=tmp_path, stop_at_step=10)
  resumed = tiny_train(small, model=BATCH_NORM, checkpoint_dir=tmp_path, resume=True)
  assert_trees_equal(straight.state.variables(), resumed.state.variables())
  assert_trees_equal(straight.state.opt_state, resumed.state.opt_state)
  # The running averages moved from their initial 0 / 1 and are what the checkpoint holds.
  assert np.abs(leaves(straight.state.batch_stats)[0]).max() > 1e-3
  restored, _ = load_model(tmp_path)
  images = jax.numpy.asarray(small["test"].images[:50, :, :, None] / 255.0, np.float32)
  np.testing.assert_array_equal(restored(images), resumed.model(images))


def test_batch_norm_statistics_span_the_global_batch_across_devices(small):
  one = tiny_train(small, model=BATCH_NORM, epochs=1, mesh=make_mesh(jax.devices()[:1]))
  four = tiny_train(small, model=BATCH_NORM, epochs=1, mesh=make_mesh(jax.devices()))
  # jit computes batch statistics over the global batch, whatever the sharding: one device
  # and four end with the same parameters and running averages, up to summation order.
  for x, y in zip(leaves(one.state.variables()), leaves(four.state.variables()), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(small, tmp_path):
  def interrupt(step, scalars):
    if step >= 10:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    tiny_train(small, checkpoint_dir=tmp_path, writer=OnScalars(interrupt))
  saved = CheckpointManager(tmp_path).latest_step()
  assert saved is not None and 10 <= saved < 16
  resumed = tiny_train(small, checkpoint_dir=tmp_path, resume=True)
  assert_trees_equal(tiny_train(small).state.params, resumed.state.params)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(small, tmp_path, monkeypatch):
  tiny_train(small, epochs=2, checkpoint_dir=tmp_path, stop_at_step=8)
  good, _ = load_model(tmp_path)
  real = train_lib.cross_entropy
  monkeypatch.setattr(train_lib, "cross_entropy", lambda *a: real(*a) * np.nan)
  with pytest.raises(FloatingPointError, match="non-finite"):
    tiny_train(small, epochs=2, checkpoint_dir=tmp_path, resume=True)
  assert CheckpointManager(tmp_path).latest_step() == 8
  after, _ = load_model(tmp_path)
  assert_trees_equal(jax.tree.leaves(good), jax.tree.leaves(after))


def test_resume_with_other_settings_is_refused(small, tmp_path):
  tiny_train(small, epochs=1, checkpoint_dir=tmp_path, stop_at_step=4)
  # Settings that change no parameter may differ.
  tiny_train(small, epochs=1, eval_batch_size=100, checkpoint_dir=tmp_path, resume=True)
  with pytest.raises(ValueError, match="batch_size=64, not 32"):
    tiny_train(small, epochs=2, batch_size=32, checkpoint_dir=tmp_path, resume=True)
  with pytest.raises(ValueError, match="model config"):
    train_lib.train(small, ModelConfig(), TrainConfig(epochs=2, batch_size=64,
                                                      steps_per_dispatch=2, validation=0,
                                                      outlier_exposure=0.0),
                    checkpoint_dir=str(tmp_path), resume=True)


def test_a_new_run_never_writes_over_a_checkpoint(small, tmp_path):
  first = tiny_train(small, epochs=1, checkpoint_dir=tmp_path)
  files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match="already holds a checkpoint \\(step 8\\)"):
    tiny_train(small, epochs=1, seed=5, checkpoint_dir=tmp_path)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
  model, _ = load_model(tmp_path)
  assert_trees_equal(nnx.state(model, nnx.Param), first.state.params)


def test_resume_without_checkpoint_is_file_not_found(small, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    tiny_train(small, checkpoint_dir=tmp_path / "empty", resume=True)


def test_batch_must_split_evenly_across_devices(small):
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    tiny_train(small, batch_size=30, mesh=make_mesh())


def test_training_on_cpu_compiles_convolutions_with_xlas_own_kernels():
  options = train_lib.training_compiler_options(make_mesh())
  assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
  x, kernel = jax.ShapeDtypeStruct((8, 14, 14, 32), "float32"), jax.ShapeDtypeStruct(
      (3, 3, 32, 64), "float32")

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  default = jax.jit(conv).lower(x, kernel).compile().as_text()
  training = jax.jit(conv, compiler_options=options).lower(x, kernel).compile().as_text()
  assert "__ynn_fusion" not in training and "convolution(" in training
  if "__ynn_fusion" not in default:
    pytest.skip("this XLA does not hand convolutions to YNNPACK by default")


@pytest.mark.parametrize("outliers", [0.0, 0.5])
def test_a_fresh_run_compiles_each_program_once_ahead_of_its_first_use(small, tmp_path, caplog,
                                                                       outliers):
  # The training chunk, the evaluation and the finiteness check are compiled on a background
  # thread from shapes alone (training._compile_ahead); had those shapes or shardings differed
  # from the real arguments', the first call would compile each a second time. A config no
  # other test uses, so that nothing is in jit's caches already.
  model = ModelConfig(conv_features=(5,), dense_features=(7 + int(outliers * 2),))
  jax.config.update("jax_log_compiles", True)  # for every thread (the context manager is not)
  try:
    with caplog.at_level("WARNING"):
      # Batches of 32 for the 64 held-out and the 300 test images alike: one program for both.
      result = tiny_train(small, model=model, epochs=1, validation=64, outlier_exposure=outliers,
                          eval_batch_size=32, checkpoint_dir=tmp_path)
  finally:
    jax.config.update("jax_log_compiles", False)
  compiled = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Finished XLA compilation of jit(")]
  for program in ("_train_chunk", "_eval_batch", "_all_finite"):
    assert sum(f"jit({program})" in m for m in compiled) == 1, (program, compiled)
  assert result.test is not None and result.history[-1]["validation_accuracy"] > 0


def test_a_ctrl_c_never_saves_non_finite_parameters(small, tmp_path, monkeypatch):
  # The interrupt was raised before the pending chunk's loss was checked, so a diverging run
  # could save NaN weights as "latest". Here the loss turns NaN from step 8 on, and Ctrl-C
  # arrives right after the first such chunk is dispatched.
  import os
  import signal
  tiny_train(small, epochs=2, checkpoint_dir=tmp_path, stop_at_step=8)
  good, _ = load_model(tmp_path)
  real = train_lib.cross_entropy

  class CtrlCOnce(InMemoryWriter):  # Ctrl-C as training starts
    def write_hparams(self, hparams):
      if not self.hparams:
        os.kill(os.getpid(), signal.SIGINT)
      super().write_hparams(hparams)

  monkeypatch.setattr(train_lib, "cross_entropy", lambda *a: real(*a) * np.nan)
  with pytest.raises(FloatingPointError, match="non-finite"):
    tiny_train(small, epochs=2, checkpoint_dir=tmp_path, resume=True, writer=CtrlCOnce())
  assert CheckpointManager(tmp_path).latest_step() == 8
  assert_trees_equal(jax.tree.leaves(good), jax.tree.leaves(load_model(tmp_path)[0]))


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(small, tmp_path):
  import os
  import signal
  presses = []

  def ctrl_c_twice(step, scalars):
    if scalars.get("epoch") == 1:
      presses.append(os.kill(os.getpid(), signal.SIGINT))  # sets the flag
      presses.append(os.kill(os.getpid(), signal.SIGINT))  # raises here, before the save

  with pytest.raises(KeyboardInterrupt):
    tiny_train(small, epochs=3, checkpoint_dir=tmp_path, writer=OnScalars(ctrl_c_twice))
  assert len(presses) == 1  # the second press interrupted the writer itself
  assert CheckpointManager(tmp_path, read_only=True).latest_step() is None  # nothing half-saved
  # and the handler is gone again: a press now is a plain KeyboardInterrupt
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stop_at_step_zero_trains_nothing(small, tmp_path):
  writer = InMemoryWriter()
  result = tiny_train(small, epochs=1, checkpoint_dir=tmp_path, stop_at_step=0, writer=writer)
  assert int(result.state.step) == 0 and result.history == []
  assert writer.scalars == []
  with pytest.raises(ValueError, match="stop_at_step must be >= 0"):
    tiny_train(small, epochs=1, stop_at_step=-1)


def test_a_batch_as_large_as_the_data_trains(small):
  # One step per epoch: the schedule's decay used to be empty ("requires positive decay_steps").
  result = tiny_train(small, epochs=1, batch_size=512)
  assert int(result.state.step) == 1


def test_progress_rate_is_never_a_false_zero(small):
  writer = InMemoryWriter()
  tiny_train(small, epochs=2, steps_per_dispatch=1, writer=writer)
  rates = [(step // 8 + 1, scalars.get("train/images_per_second"))
           for step, scalars in writer.scalars if periodic(scalars)]
  first_of = {epoch: rate for epoch, rate in reversed(rates)}
  assert first_of[1] is None  # the first chunk carries compilation: no rate yet
  assert first_of[2] > 0  # later epochs have one from their first update
  assert all(rate is None or rate > 0 for _, rate in rates)


def _learning_rate(config, steps_per_epoch, step):
  return float(train_lib.learning_rate_schedule(config, steps_per_epoch)(step))


def test_resume_keeps_the_schedule_and_extends_only_a_finished_run(small, tmp_path):
  from flaxdigits.checkpoint import resume_configs
  tiny_train(small, epochs=2, checkpoint_dir=tmp_path, stop_at_step=4)  # interrupted mid-run
  with pytest.raises(ValueError, match="stopped at step 4, before its end; resume it with its own "
                                       "2 epochs"):
    tiny_train(small, epochs=3, checkpoint_dir=tmp_path, resume=True)
  finished = tiny_train(small, epochs=2, checkpoint_dir=tmp_path, resume=True)
  assert int(finished.state.step) == 16
  with pytest.raises(ValueError, match="already finished 2 epochs"):
    resume_configs(tmp_path, epochs=1)
  plan = resume_configs(tmp_path, epochs=4)
  assert plan.train_config.cycle_start == 2 and "epochs 3-4 get a learning-rate cycle" in plan.note
  writer = InMemoryWriter()
  extended = tiny_train(small, epochs=4, checkpoint_dir=tmp_path, resume=True, writer=writer)
  assert [h["epoch"] for h in extended.history] == [1, 2, 3, 4]
  assert int(extended.state.step) == 32
  assert any("learning-rate cycle" in t["note"] for _, t in writer.texts)
  # The added epochs' cycle starts at its warm-up value, not mid-way down a 4-epoch cosine.
  config = plan.train_config
  assert _learning_rate(config, 8, 16) == pytest.approx(config.learning_rate / 25, rel=0.05)
  assert _learning_rate(config, 8, 31) < config.learning_rate / 10


def test_resume_on_other_data_is_refused(small, tmp_path):
  tiny_train(small, epochs=2, checkpoint_dir=tmp_path, stop_at_step=4)
  fewer = {"train": Split(small["train"].images[:256], small["train"].labels[:256]),
           "test": small["test"]}
  with pytest.raises(ValueError, match="trained on 512 training images, this data has 256"):
    tiny_train(fewer, epochs=2, checkpoint_dir=tmp_path, resume=True)



def test_training_imports_the_outlier_renderer_only_when_it_needs_it():
  # A cold `digits train` without outlier exposure (the speedrun) skips Pillow and SciPy.
  code = ("import sys, flaxdigits.training\n"
          "print([m for m in ('flaxdigits.outliers', 'scipy.ndimage', 'PIL.Image') "
          "if m in sys.modules])\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"
