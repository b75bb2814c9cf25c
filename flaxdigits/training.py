"""Training: one pytree of state, a pure jitted step run K steps per dispatch over a device mesh."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import math
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxdigits import calibration as calibration_lib
from flaxdigits import distributed, parallel
from flaxdigits import evaluation as evaluation_lib
from flaxdigits.augment import augment_batch
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.data import IMAGE_SHAPE, Split, check_hold_out, hold_out, normalize
from flaxdigits.evaluation import EvalResult, cross_entropy, evaluate
from flaxdigits.model import CNN, abstract_model, build_model, count_params
from flaxdigits.writers import EPOCH_TAGS, MetricWriter, MultiWriter

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything training needs to continue: checkpointed whole."""

  step: jax.Array
  params: PyTree  # the nnx.Param state: what the optimiser trains
  batch_stats: PyTree  # the nnx.BatchStat state (running averages); empty without batch norm
  opt_state: PyTree
  key: jax.Array  # raw uint32 PRNG key; per-epoch and per-step keys are folded in from it

  def variables(self) -> tuple[PyTree, PyTree]:
    """The model's whole state, for nnx.merge(graphdef, *state.variables())."""
    return self.params, self.batch_stats


@dataclasses.dataclass
class TrainResult:
  model: CNN
  state: TrainState
  history: list[dict[str, float]]
  test: EvalResult | None


# ----------------------------------------------------------------------------- the step


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """One cycle (linear warm-up, cosine decay) over the epochs from config.cycle_start (0: all of
  them) to config.epochs; a function of the optimiser's step count."""
  start = config.cycle_start * steps_per_epoch
  total = (config.epochs - config.cycle_start) * steps_per_epoch
  warmup = max(1, int(config.warmup_fraction * total))
  cycle = optax.warmup_cosine_decay_schedule(
      init_value=config.learning_rate / 25, peak_value=config.learning_rate,
      warmup_steps=warmup, decay_steps=max(total, warmup + 1),  # a one-step run still decays
      end_value=config.learning_rate / 1e3)
  return cycle if start == 0 else (lambda count: cycle(count - start))


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW under learning_rate_schedule."""
  return optax.adamw(learning_rate_schedule(config, steps_per_epoch),
                     weight_decay=config.weight_decay)


def outlier_batch_size(config: TrainConfig, num_devices: int) -> int:
  """Outliers per step: a quarter of the batch, a whole number per device; 0 without them."""
  if not config.outlier_exposure:
    return 0
  return max(1, -(-config.batch_size // 4 // num_devices)) * num_devices


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: TrainConfig,
               batch_sharding: jax.sharding.Sharding, state: TrainState,
               images_uint8_BxHxW: jax.Array, labels_B: jax.Array,
               outliers_uint8_PxHxW: jax.Array | None = None,
               num_outliers: int = 0) -> tuple[TrainState, dict]:
  """One optimiser step: pure (state, batch) -> (state, metric sums).

  With outlier exposure, num_outliers images drawn from the pool outliers_uint8_PxHxW join the
  batch (augmented like the digits), and the loss adds config.outlier_exposure times their
  cross-entropy against uniform probabilities (Hendrycks et al., 2019): the model learns to be
  unsure of what is not a digit. Metrics count the digits only.
  """
  num_digits = labels_B.shape[0]
  sharded = lambda x: jax.lax.with_sharding_constraint(x, batch_sharding)
  images = augment_batch(config, state.key, state.step, sharded(normalize(images_uint8_BxHxW)))
  if num_outliers:
    pick_key = jax.random.fold_in(jax.random.fold_in(state.key, 4), state.step)
    picked = outliers_uint8_PxHxW[jax.random.randint(pick_key, (num_outliers,), 0,
                                                     outliers_uint8_PxHxW.shape[0])]
    others = augment_batch(config, jax.random.fold_in(state.key, 5), state.step,
                      sharded(normalize(picked)))
    images = sharded(jnp.concatenate([images, others]))

  dropout_key = jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    logits = model(images, dropout_key=dropout_key, train=True)
    logits_BxK = logits[:num_digits]
    loss = cross_entropy(logits_BxK, labels_B, config.label_smoothing).mean()
    if num_outliers:  # cross-entropy against the uniform distribution
      others = logits[num_digits:]
      loss += config.outlier_exposure * jnp.mean(
          jax.nn.logsumexp(others, -1) - jnp.mean(others, -1))
    return loss, (logits_BxK, nnx.state(model, nnx.BatchStat))

  (loss, (logits_BxK, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss_sum": loss * num_digits,
             "correct": jnp.sum(jnp.argmax(logits_BxK, -1) == labels_B),
             "count": jnp.asarray(num_digits)}
  return TrainState(state.step + 1, params, batch_stats, opt_state, state.key), metrics


def _train_chunk(step_fn: Callable, num_steps: int, state: TrainState, images_NxHxW: jax.Array,
                 labels_N: jax.Array, outliers_PxHxW: jax.Array, perm_SxB: jax.Array,
                 start: jax.Array):
  """num_steps steps in one dispatch, fully unrolled: on CPU an XLA loop around a conv step
  runs many times slower than straight-line code, and one dispatch per step wastes the host."""
  idx_KxB = jax.lax.dynamic_slice_in_dim(perm_SxB, start, num_steps)
  return _run_steps(step_fn, state, images_NxHxW[idx_KxB], labels_N[idx_KxB], outliers_PxHxW)


def _train_chunk_fed(step_fn: Callable, state: TrainState, outliers_PxHxW: jax.Array,
                     images_KxBxHxW: jax.Array, labels_KxB: jax.Array, stop_D: jax.Array):
  """_train_chunk for a job of several processes, each feeding its rows of every batch.

  stop_D holds each device's process's interrupt flag; their maximum, returned as the metric
  "stop", is the same on every process: a decision they all take after the same chunk.
  """
  state, totals = _run_steps(step_fn, state, images_KxBxHxW, labels_KxB, outliers_PxHxW)
  return state, totals | {"stop": jnp.max(stop_D)}


def _run_steps(step_fn: Callable, state: TrainState, images_KxBxHxW: jax.Array,
               labels_KxB: jax.Array, outliers_PxHxW: jax.Array):
  totals = None
  for i in range(images_KxBxHxW.shape[0]):
    state, metrics = step_fn(state, images_KxBxHxW[i], labels_KxB[i], outliers_PxHxW)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
  return state, totals


class _HostFeed:
  """In a job of several processes: each one's rows of each chunk of global batches, taken from
  its own host copy of the data, made into global arrays (jax.make_array_from_process_local_data).
  Every process holds the same epoch permutation, so together they feed exactly the batches one
  process would."""

  def __init__(self, mesh: Mesh, split: Split, steps: int, batch_size: int):
    self.images, self.labels = split.images, split.labels.astype(np.int32)
    self.shape = (steps, batch_size)
    self.batches = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    self.rows = distributed.local_batch(self.batches, self.shape, axis=1)
    self.flags = parallel.batch_sharded(mesh)
    self.num_devices = mesh.size
    self.flag_rows = distributed.local_batch(self.flags, (mesh.size,), axis=0)

  def __call__(self, perm_SxB: np.ndarray, start: int, stop: bool):
    idx_KxL = perm_SxB[start:start + self.shape[0], self.rows]
    flags = np.full(self.flag_rows.stop - self.flag_rows.start, stop, np.int32)
    return (jax.make_array_from_process_local_data(self.batches, self.images[idx_KxL],
                                                   self.shape + self.images.shape[1:]),
            jax.make_array_from_process_local_data(self.batches, self.labels[idx_KxL], self.shape),
            jax.make_array_from_process_local_data(self.flags, flags, (self.num_devices,)))


# XLA's CPU backend hands convolutions to YNNPACK by default. Its forward convolutions are fast,
# but its gradient convolutions are slow: the default CNN's jitted gradient on one CPU device,
# batch 64, took 45 ms with YNNPACK and 21 ms with XLA's own (Eigen) kernels. Evaluation and
# prediction keep the default, which is faster for the forward pass alone.
_CPU_TRAINING_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_accepts(option: str, value: str) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except  # an XLA that lacks the option
    return False
  return True


def training_compiler_options(mesh: Mesh) -> dict[str, str] | None:
  """XLA options for the training program: on CPU, convolutions by XLA's own kernels."""
  if mesh.devices.flat[0].platform != "cpu":
    return None
  options = {name: value for name, value in _CPU_TRAINING_OPTIONS.items()
             if _cpu_accepts(name, value)}
  return options or None


def steps_per_dispatch(steps_per_epoch: int, wanted: int) -> int:
  """The largest K <= wanted dividing the epoch, so chunks never straddle an epoch boundary."""
  return max(k for k in range(1, min(wanted, steps_per_epoch) + 1) if steps_per_epoch % k == 0)


@functools.partial(parallel.jit_run_once, static_argnames=("n", "steps", "batch_size"))
def epoch_permutation(key: jax.Array, epoch: int, *, n: int, steps: int,
                      batch_size: int) -> jax.Array:
  """The epoch's shuffled example indices as (steps, batch_size); the remainder sits out."""
  perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0), epoch), n)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def init_state(model: CNN, tx: optax.GradientTransformation, seed: int) -> TrainState:
  params = nnx.state(model, nnx.Param)
  # One program for all the optimiser's zeros: eagerly each shape compiles its own.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=nnx.state(model, nnx.BatchStat),
                    opt_state=parallel.jit_run_once(tx.init)(params),
                    key=jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- the loop


def train(data: dict[str, Split], model_config: ModelConfig = ModelConfig(),
          train_config: TrainConfig = TrainConfig(), *, checkpoint_dir: str | None = None,
          resume: bool = False, writer: MetricWriter | None = None, mesh: Mesh | None = None,
          stop_at_step: int | None = None, evaluate_each_epoch: bool = True) -> TrainResult:
  """Trains the CNN on data["train"], scoring data["test"] after each epoch.

  With train_config.validation > 0, that many training images are held out (data.hold_out, the
  same for every seed): each epoch is scored on them instead, a temperature and a not-a-digit
  threshold are fitted on them (flaxdigits.calibration) and saved with the checkpoint, and
  data["test"] is scored once, after the last epoch. With train_config.outlier_exposure > 0 the
  model also learns from synthetic non-digits (flaxdigits.outliers).

  Progress and metrics go to `writer` (flaxdigits.writers: the CLI's display, TensorBoard, or
  several at once); the library never prints.

  With checkpoint_dir, saves (state, configs, history) after every epoch, on Ctrl-C or SIGTERM
  (then raises KeyboardInterrupt) and at the end; every save first checks that the parameters are
  finite. A second Ctrl-C stops at once without saving, keeping the last checkpoint. With resume,
  continues from the newest checkpoint there that reads back whole (checkpoint.resolve_resume
  says which settings may change). stop_at_step ends training early at a chunk boundary, as an
  interruption would.

  Raises:
    FloatingPointError: the loss or the parameters became non-finite (the last good checkpoint
      is kept).
    FileNotFoundError: resume without a checkpoint.
    ValueError: bad config, a checkpoint written by an incompatible config or on other data,
      (without resume) a checkpoint_dir that already holds a checkpoint, or one that cannot be
      written.
    OSError: a save failed (disk full, say); the checkpoints already there are kept.
  """
  from flaxdigits import checkpoint  # pylint: disable=import-outside-toplevel
  writer = writer or MultiWriter([])  # nobody listening: a writer of no writers
  if stop_at_step is not None and stop_at_step < 0:
    raise ValueError(f"stop_at_step must be >= 0, got {stop_at_step}")
  if resume and checkpoint_dir is None:
    raise ValueError("resume needs a checkpoint directory")
  mesh = mesh or parallel.make_mesh()
  parallel.check_divisible(train_config.batch_size, mesh)
  multi = jax.process_count() > 1
  check_hold_out(len(data["train"]), train_config.validation)
  num_train = len(data["train"]) - train_config.validation  # before the split is copied out
  test_split = data.get("test")
  steps_per_epoch = num_train // train_config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {train_config.batch_size} exceeds the {num_train} "
                     "training examples")
  if train_config.epochs * steps_per_epoch > _MAX_STEPS:
    raise ValueError(f"{train_config.epochs} epochs of {steps_per_epoch} steps is "
                     f"{train_config.epochs * steps_per_epoch:,} steps, more than the step "
                     f"counter holds ({_MAX_STEPS:,})")

  with contextlib.ExitStack() as cleanup:
    manager = None
    if checkpoint_dir is not None:
      if not resume:
        checkpoint.refuse_existing(checkpoint_dir)
      manager = cleanup.enter_context(checkpoint.CheckpointManager(checkpoint_dir))
    # Left first, so its thread is done before anything else is let go.
    ahead = cleanup.enter_context(parallel.AheadOfTime())
    abstract = abstract_model(model_config)
    graphdef = nnx.graphdef(abstract)
    num_outliers = outlier_batch_size(train_config, mesh.size)
    k = steps_per_dispatch(steps_per_epoch, train_config.steps_per_dispatch)

    def chunk_program(tx):  # the jitted chunk of k steps (in a job: the fed one)
      step_fn = functools.partial(train_step, graphdef, tx, train_config,
                                  parallel.batch_sharded(mesh), num_outliers=num_outliers)
      chunk = (functools.partial(_train_chunk_fed, step_fn) if multi else
               functools.partial(_train_chunk, step_fn, k))
      return jax.jit(chunk, donate_argnums=0, compiler_options=training_compiler_options(mesh))

    tx = make_optimizer(train_config, steps_per_epoch)
    program = chunk_program(tx)
    program_ready = None
    if not (resume or multi):  # (a resumed run may change its recipe; a job's feed differs)
      program_ready = _compile_ahead(ahead, program, abstract, train_config, tx, mesh,
                                     num_train=num_train, steps_per_epoch=steps_per_epoch,
                                     num_outliers=num_outliers, test_split=test_split,
                                     saves=checkpoint_dir is not None)
    train_split, validation_split = _split(data, train_config)
    model = build_model(model_config, seed=train_config.seed)
    state = init_state(model, tx, train_config.seed)
    history: list[dict[str, float]] = []
    calibration = None
    notes: tuple[str, ...] = ()
    if resume:
      state, meta, plan, skipped = checkpoint.restore_for_resume(
          manager, state, model_config, train_config, len(train_split), mesh=mesh)
      if plan.train_config != train_config:  # an extension: the added epochs' own cycle
        train_config = plan.train_config
        tx = make_optimizer(train_config, steps_per_epoch)
        program = chunk_program(tx)
      history = meta["history"]
      if meta.get("calibration"):
        calibration = calibration_lib.Calibration.from_dict(meta["calibration"])
      notes = tuple(skipped) + ((plan.note,) if plan.note else ())
      if skipped:
        notes += (f"resumed from step {meta['step']}, the newest step that reads back whole; "
                  "the damaged step folders were renamed *.damaged-*",)
    total_steps = train_config.epochs * steps_per_epoch
    state = parallel.replicate(state, mesh)
    pool = parallel.replicate(_outlier_pool(train_split, num_outliers), mesh)
    if multi:  # each process feeds its own rows; the interrupt flag rides along
      feed = _HostFeed(mesh, train_split, k, train_config.batch_size)
      chunk_fn = lambda state, perm, start, stop: program(state, pool, *feed(perm, start, stop))
    else:  # the whole training set on the device, batches gathered inside the program
      images, labels = parallel.replicate(
          (train_split.images, train_split.labels.astype(np.int32)), mesh)
      chunk_fn = lambda state, perm, start, stop: program(state, images, labels, pool, perm,
                                                          start)

    def save(state):
      if manager is None:
        return
      if not bool(_all_finite(state.params)):
        raise FloatingPointError(f"parameters became non-finite by step {int(state.step)}; "
                                 "lower --lr (the last good checkpoint is kept)")
      manager.save(state, model_config, train_config, history, train_examples=len(train_split),
                   calibration=calibration)

    start_step = int(state.step)
    end_step = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
    interrupted = cleanup.enter_context(_deferred_interrupt())
    # One program for the schedule's table: eagerly, each of its ops would compile its own.
    schedule = jax.jit(jax.vmap(learning_rate_schedule(train_config, steps_per_epoch)))
    writer.write_hparams({"num_params": count_params(model), "num_devices": mesh.size,
                          "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                          "start_step": start_step,
                          **{f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()},
                          **{f"train.{k}": v for k, v in dataclasses.asdict(train_config).items()}})
    for note in notes:
      writer.write_texts(start_step, {"note": note})
    test_result = None
    compiled = False  # the process's first chunk carries compilation: rates start after it
    pending = None
    try:
      for epoch in range(start_step // steps_per_epoch, math.ceil(end_step / steps_per_epoch)):
        perm = epoch_permutation(state.key, epoch, n=len(train_split), steps=steps_per_epoch,
                                 batch_size=train_config.batch_size)
        if multi:  # the same on every process: computed from the same key
          perm = np.asarray(jax.device_get(perm))
        first = max(start_step, epoch * steps_per_epoch) - epoch * steps_per_epoch
        last = min(end_step - epoch * steps_per_epoch, steps_per_epoch)
        # The epoch's learning rates, computed now, while nothing is in flight.
        rates = np.asarray(schedule(np.arange(epoch * steps_per_epoch,
                                              (epoch + 1) * steps_per_epoch + 1)))
        if program_ready is not None:  # rather than compile it a second time beside it
          _await_compilation(program_ready)
          program_ready = None
        t_epoch = time.perf_counter()
        sums = {"loss_sum": 0.0, "correct": 0, "count": 0}
        pending, t_rate, rate_images = None, (t_epoch if compiled else None), 0
        stop = False
        for start in range(first, last, k):
          state, metrics = chunk_fn(state, perm, start, interrupted.is_set())
          if pending is not None:  # read the previous chunk's metrics while this one runs
            stop = _accumulate(sums, pending, epoch * steps_per_epoch + start)
            now = time.perf_counter()
            if t_rate is None:  # time from the end of the compiling chunk
              t_rate, compiled = now, True
            else:
              rate_images += k * train_config.batch_size
            running = {"train/loss": sums["loss_sum"] / sums["count"],
                       "train/accuracy": sums["correct"] / sums["count"],
                       "train/learning_rate": float(rates[start - 1])}  # the last step's
            if rate_images:
              running["train/images_per_second"] = rate_images / (now - t_rate)
            writer.write_scalars(epoch * steps_per_epoch + start, running)
          pending = metrics
          if stop if multi else interrupted.is_set():  # all processes stop after this chunk
            raise KeyboardInterrupt
        if pending is not None:  # waits for the last chunk
          stop = _accumulate(sums, pending, epoch * steps_per_epoch + last)
          pending, compiled = None, True
        train_seconds = time.perf_counter() - t_epoch
        if last < steps_per_epoch:  # stopped early, mid-epoch
          break
        record = {"epoch": epoch + 1, "step": int(state.step),
                  "train_loss": sums["loss_sum"] / max(sums["count"], 1),
                  "train_accuracy": sums["correct"] / max(sums["count"], 1),
                  "train_seconds": train_seconds}
        final = int(state.step) == total_steps
        model_now = lambda: nnx.merge(graphdef, *state.variables())
        if validation_split is not None and (evaluate_each_epoch or final):
          # Scores and calibration on the held-out images; the test set waits for the end.
          held_out = evaluate(model_now(), validation_split,
                              batch_size=train_config.eval_batch_size, mesh=mesh)
          calibration = calibration_lib.fit(held_out.logits, validation_split.labels)
          record |= {"validation_loss": held_out.loss,
                     "validation_accuracy": held_out.accuracy,
                     "temperature": calibration.temperature}
        if test_split is not None and (final if validation_split is not None
                                       else evaluate_each_epoch):
          test_result = evaluate(model_now(), test_split,
                                 batch_size=train_config.eval_batch_size, mesh=mesh)
          record |= {"test_loss": test_result.loss, "test_accuracy": test_result.accuracy}
        record["seconds"] = time.perf_counter() - t_epoch
        history.append(record)
        writer.write_scalars(record["step"], {EPOCH_TAGS[k]: v for k, v in record.items()
                                              if k in EPOCH_TAGS})
        writer.flush()
        save(state)
        # Ctrl-C during evaluation or the save, on any process.
        if stop or distributed.any_process(interrupted.is_set()):
          raise KeyboardInterrupt
    except KeyboardInterrupt:
      # Save only a state that is whole and checked: after a second Ctrl-C the interrupt may have
      # struck inside a dispatch, after the state's buffers were donated.
      if not interrupted.forced and not _donated(state):
        if pending is not None:
          _accumulate({"loss_sum": 0.0, "correct": 0, "count": 0}, pending, int(state.step))
        save(state)
      raise
    save(state)
  return TrainResult(nnx.merge(graphdef, *jax.device_get(state.variables())), state, history,
                     test_result)


def _compile_ahead(ahead: parallel.AheadOfTime, program: Callable, abstract: CNN,
                   train_config: TrainConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                   num_train: int, steps_per_epoch: int, num_outliers: int,
                   test_split: Split | None, saves: bool):
  """Submits to `ahead` what a fresh single-process run will compile or import, in the order it
  needs them: the training chunk (program), the evaluation, the finiteness check before each
  save, and SciPy's optimiser for the calibration. Returns the training chunk's future.

  Each is lowered from shapes and shardings equal to those of the arguments train() passes, so
  the first real call finds it in jit's cache; tests check that each compiles once. `abstract`
  is the model as model.abstract_model gives it.
  """
  @functools.cache  # on the background thread, once for the chunk and the check
  def abstract_state():  # the shapes of init_state's, replicated
    params = nnx.state(abstract, nnx.Param)
    return parallel.replicated_shapes(
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                   batch_stats=nnx.state(abstract, nnx.BatchStat),
                   opt_state=jax.eval_shape(tx.init, params),
                   key=jax.eval_shape(jax.random.PRNGKey, 0)), mesh)

  def compile_chunk():
    pool = min(OUTLIER_POOL, num_train) if num_outliers else 1
    shape = jax.ShapeDtypeStruct
    data = parallel.replicated_shapes(
        (shape((num_train,) + IMAGE_SHAPE, np.uint8), shape((num_train,), np.int32),
         shape((pool,) + IMAGE_SHAPE, np.uint8),
         shape((steps_per_epoch, train_config.batch_size), np.int32)), mesh)
    program.lower(abstract_state(), *data, 0).compile()

  ready = ahead.submit("training program", compile_chunk)
  scored = train_config.validation or (len(test_split) if test_split is not None else 0)
  if scored:
    ahead.submit("evaluation program", lambda: evaluation_lib.compile_ahead(
        abstract, scored, batch_size=train_config.eval_batch_size, mesh=mesh))
  if saves:
    ahead.submit("finiteness check", lambda: _all_finite.lower(abstract_state().params).compile())
  if train_config.validation:
    ahead.submit("calibration's SciPy", lambda: importlib.import_module("scipy.optimize"))
  return ready


def _await_compilation(future: concurrent.futures.Future) -> None:
  """Waits for a program that _compile_ahead submitted (scripts/bench_speedrun.py times it)."""
  future.result()


def _outlier_pool(train_split: Split, num_outliers: int,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
  """The synthetic non-digits outlier exposure draws from (a placeholder image without it):
  OUTLIER_POOL of them, or as many as there are training images if fewer."""
  if not num_outliers:
    return np.zeros((1, 28, 28), np.uint8)
  from flaxdigits import outliers  # pylint: disable=import-outside-toplevel  # Pillow, SciPy
  return outliers.cached(min(OUTLIER_POOL, len(train_split)), outliers.TRAIN_SEED, train_split,
                         progress=progress)


def _split(data: dict[str, Split], config: TrainConfig) -> tuple[Split, Split | None]:
  """(the images trained on, the held-out ones or None) of data["train"]."""
  if not config.validation:
    return data["train"], None
  return hold_out(data["train"], config.validation)


def outliers_to_render(data: dict[str, Split], config: TrainConfig) -> int:
  """How many outlier images training with `config` on `data` must render first (0 when they
  are on disk from an earlier run, or without outlier exposure)."""
  if not config.outlier_exposure:
    return 0
  from flaxdigits import outliers  # pylint: disable=import-outside-toplevel
  train_split, _ = _split(data, config)
  n = min(OUTLIER_POOL, len(train_split))
  return 0 if outliers.cache_path(n, outliers.TRAIN_SEED, train_split).is_file() else n


def prepare_outliers(data: dict[str, Split], config: TrainConfig,
                     progress: Callable[[int], None] | None = None) -> None:
  """Renders (and keeps on disk) the outliers `train` will use, calling progress(1) per image:
  for a progress bar before training starts."""
  if config.outlier_exposure:
    _outlier_pool(_split(data, config)[0], 1, progress)


# Outlier exposure's pool: each step augments the images it draws, as it does the digits.
OUTLIER_POOL = 4000
# The step counter is an int32 array.
_MAX_STEPS = 2**31 - 1


@parallel.jit_run_once
def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _donated(state: TrainState) -> bool:
  return any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))


class _Interrupts(threading.Event):
  """Set by the first Ctrl-C; `forced` once a second one has interrupted whatever ran."""

  forced = False


@contextlib.contextmanager
def _deferred_interrupt():
  """Turns the first Ctrl-C or SIGTERM (a scheduler's preemption notice) into a flag checked
  between dispatches; a second one raises KeyboardInterrupt at once (a long compilation stays
  interruptible) and marks the flag forced.

  A KeyboardInterrupt raised inside a dispatch could strike after the state's buffers were
  donated and before the new state exists, leaving nothing to save. In a job of several
  processes the flag travels with every chunk, so all of them stop after the same one. Only the
  main thread can own signal handlers; elsewhere this does nothing.
  """
  flag = _Interrupts()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  signals = (signal.SIGINT, signal.SIGTERM)
  previous = {signum: signal.getsignal(signum) for signum in signals}

  def handler(signum, frame):
    if flag.is_set():
      flag.forced = True
      raise KeyboardInterrupt
    flag.set()

  for signum in signals:
    signal.signal(signum, handler)
  try:
    yield flag
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def _accumulate(sums: dict, metrics: dict, step: int) -> bool:
  """Adds a chunk's metric sums to `sums`; returns its shared stop decision (multi-process)."""
  metrics = jax.device_get(metrics)
  stop = bool(metrics.pop("stop", False))
  if not np.isfinite(metrics["loss_sum"]):
    raise FloatingPointError(
        f"loss became non-finite by step {step}; lower --lr "
        "(the last good checkpoint is kept)")
  for name, value in metrics.items():
    sums[name] += value.item()
  return stop
