"""Multi-process jobs: start-up, "am I process 0", and what every process must agree on."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

# Seconds: how long process 0 waits for the others to join (a cluster may start them minutes
# apart), and how long a silent process is given before the job is ended.
INIT_TIMEOUT_ENV = "FLAXDIGITS_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 300
# The coordinator declares a process dead after this long without a heartbeat: a host that dies
# without closing its sockets ends the job in about this time, not JAX's default 100 s.
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 30
# JAX's cluster detections that need no extra package and no opt-in: Kubernetes needs explicit
# settings here (an indexed Job's JOB_COMPLETION_INDEX is the process id).
_AUTO_DETECTED = ("SlurmCluster", "OmpiCluster", "GceTpuCluster", "GkeTpuCluster")


@dataclasses.dataclass(frozen=True)
class Job:
  """Where this process stands in its job: `process_id` of `num_processes`."""

  num_processes: int = 1
  process_id: int = 0
  coordinator: str | None = None
  detected_by: str | None = None  # the JAX cluster detection used, if any


def cluster_detected() -> str | None:
  """The name of the cluster environment JAX would detect here (SLURM, Open MPI, Cloud TPU)."""
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    kinds = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # a JAX that moved it: explicit settings still work
    return None
  for kind in kinds:
    if kind.__name__ in _AUTO_DETECTED and not kind.opt_in_only_method and kind.is_env_present():
      return kind.__name__.removesuffix("Cluster")
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, init_timeout_s: int | None = None) -> Job:
  """Joins the multi-process job this process belongs to; must run before any JAX computation.

  With `coordinator`, `num_processes` and `process_id` (all three, or none), joins that job.
  With none, and a cluster JAX detects by itself (SLURM, Open MPI, Cloud TPU), joins it through
  JAX's detection. Otherwise, or with num_processes 1, does nothing: one process, as always.

  Raises:
    ValueError: some but not all settings, or settings out of range.
  """
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
  if len(missing) not in (0, 3):
    raise ValueError(f"a multi-process job needs --coordinator, --num-processes and "
                     f"--process-id together; missing {' '.join(missing)}")
  timeout = init_timeout_s or int(os.environ.get(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S))
  timeouts = {"initialization_timeout": timeout, "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
              "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
  if not missing:
    if num_processes < 1:
      raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id must be in [0, {num_processes - 1}], got {process_id}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes == 1:
      return Job()
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    return Job(num_processes, process_id, coordinator)
  detected = cluster_detected()
  if detected is None:
    return Job()
  jax.distributed.initialize(**timeouts)
  return Job(jax.process_count(), jax.process_index(), None, detected)


def is_primary() -> bool:
  """Process 0: the one that reports, writes the inference bundle and sidecar files."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any one: a decision all of them share.

  A collective: every process must call it at the same point of the program.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def barrier(name: str) -> None:
  """Waits until every process of the job gets here (nothing in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def gather_rows(parts: Sequence[Sequence[jax.Array]]) -> list[np.ndarray]:
  """For each list of arrays sharded along their first axis, their concatenation along it,
  whole, as a host array on every process.

  In one process this is jax.device_get. Across processes each fills in the rows its devices
  hold and one all-gather per list combines them (a collective: all processes call it together,
  and nothing else is queued beside it); a row that no process holds raises RuntimeError rather
  than being made up.
  """
  if all(a.is_fully_addressable for arrays in parts for a in arrays):
    return [np.concatenate(jax.device_get(list(arrays))) for arrays in parts]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  local = []
  for arrays in parts:
    n = sum(a.shape[0] for a in arrays)
    rows = np.zeros((n,) + arrays[0].shape[1:], arrays[0].dtype)
    held = np.zeros(n, np.bool_)
    offset = 0
    for a in arrays:
      for shard in a.addressable_shards:
        lo, hi, _ = shard.index[0].indices(a.shape[0])
        rows[offset + lo:offset + hi] = np.asarray(shard.data)
        held[offset + lo:offset + hi] = True
      offset += a.shape[0]
    local.append((rows, held))
  whole = []
  for rows_P, held_P in multihost_utils.process_allgather(local):
    if not held_P.any(0).all():
      raise RuntimeError(f"{int((~held_P.any(0)).sum())} rows are held by no process")
    first = held_P.argmax(0)  # replicas hold equal rows: take the first holder's
    whole.append(rows_P[first, np.arange(rows_P.shape[1])])
  return whole


def local_batch(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...],
                axis: int) -> slice:
  """The contiguous range of `axis` that this process's devices hold under `sharding`."""
  ranges = {index[axis].indices(global_shape[axis])[:2]
            for index in sharding.addressable_devices_indices_map(global_shape).values()}
  start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
  if sum(b - a for a, b in ranges) != stop - start:
    raise ValueError(f"this process's devices hold a non-contiguous part of axis {axis}")
  return slice(start, stop)
