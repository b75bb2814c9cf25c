"""Data parallelism: a 1-D device mesh, batch sharded along 'data', everything else replicated."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from typing import Any, Callable, Self, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def run_once_options() -> dict[str, int] | None:
  """XLA options for programs that run once or once an epoch (initialisers, the epoch's
  shuffle, checks): on CPU, without LLVM's optimisations, which are most of such a program's
  compilation (the shuffle's 0.65 s fell to 0.42 s, and it runs ~10 ms longer an epoch). Integer
  and boolean results are the same; float ones may differ in the last bit (FMA contraction)."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def jit_run_once(fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` compiled with run_once_options(), which are decided at the
  first call: once the backend is chosen (deciding them at import would start it too early)."""
  @functools.cache
  def jitted():
    return jax.jit(fun, compiler_options=run_once_options(), **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return jitted()(*args, **kwargs)
  call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
  return call


class AheadOfTime:
  """Work done ahead of its first use on one background thread, in the order given: compiling
  programs (`jitted.lower(...).compile()` fills the cache that jitted's first call then finds)
  and slow imports, while the caller prepares what they will run on.

  XLA compiles a program on one core and releases the GIL meanwhile, so on a machine of two
  cores the caller's own work (loading, initialising, compiling its small programs) runs beside
  it. Every task is best effort: one that fails is logged and skipped, and the program is then
  compiled at its first call as usual, which raises the error where the caller sees it.
  Use as a context manager: leaving it waits for the thread, so nothing outlives the caller.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ahead-of-time")

  def submit(self, what: str, task: Callable[[], Any]) -> concurrent.futures.Future:
    def run():
      try:
        task()
      except Exception:  # pylint: disable=broad-except  # the first call compiles and raises
        logging.getLogger(__name__).debug("ahead-of-time %s failed", what, exc_info=True)
    return self._pool.submit(run)

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (by default every device of every process in the job) with one axis,
  'data'."""
  devices = list(devices) if devices is not None else jax.devices()
  # Auto axes: the compiler propagates the batch sharding and inserts the gradient all-reduce.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` on every device of the mesh. Across processes each passes its own equal copy: the
  leaves go through host memory, since one process cannot place its device arrays on another's
  devices."""
  if jax.process_count() > 1:
    tree = jax.tree.map(lambda x: x if _on(x, mesh) else np.asarray(x), tree)
  return jax.device_put(tree, replicated(mesh))


def replicated_shapes(tree: Any, mesh: Mesh) -> Any:
  """`tree` with each leaf (anything with a shape and dtype) as a jax.ShapeDtypeStruct replicated
  on the mesh: what `replicate(tree, mesh)` would pass a jitted function, for lowering it ahead of
  time."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _on(x: Any, mesh: Mesh) -> bool:
  return isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat)


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} is not divisible by the {n} devices in use")


def split_cpu_into_devices(num_devices: int | None = None) -> bool:
  """Exposes the host CPU as `num_devices` JAX devices (default: one per core).

  XLA runs one CPU device's convolutions on roughly one core; data-parallel training over one
  device per core is what uses the whole machine. It must run before JAX computes anything;
  returns False (and changes nothing) when that is too late or XLA_FLAGS already chose a count.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return False
  try:
    jax.config.update("jax_num_cpu_devices", num_devices or os.cpu_count() or 1)
  except RuntimeError:
    return False
  return True
