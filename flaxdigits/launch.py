"""Running one `digits` command as a job of N processes on this machine, over loopback."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

# What `digits train` reads (its --coordinator, --num-processes and --process-id).
COORDINATOR_ENV = "FLAXDIGITS_COORDINATOR"
NUM_PROCESSES_ENV = "FLAXDIGITS_NUM_PROCESSES"
PROCESS_ID_ENV = "FLAXDIGITS_PROCESS_ID"

# After the first failure, how long the others get to end by themselves (they see the peer gone
# within seconds) before SIGTERM, and after that before SIGKILL.
FAILURE_GRACE_S = 5.0
KILL_GRACE_S = 5.0
# After Ctrl-C, how long the processes get for their coordinated save.
INTERRUPT_GRACE_S = 120.0


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How the job ended: `returncode` for the launcher, and which process ended it first."""

  returncode: int
  failed: int | None = None  # the process index whose exit ended the job, if one failed
  reason: str | None = None  # e.g. "exited with code 1", "was killed by SIGKILL"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with code {returncode}"


def first_failure(codes: Sequence[int | None], *, interrupted: bool = False) -> int | None:
  """Which process ended the job, from one poll of their exit codes (None: still running): one
  killed by a signal before one that exited with an error, since its peers' errors follow from
  it (they see it gone); else the first to fail. After Ctrl-C, exiting 130 is not a failure."""
  ended = [index for index, code in enumerate(codes)
           if code not in (None, 0) and not (interrupted and code == 130)]
  signalled = [index for index in ended if codes[index] < 0]
  return (signalled or ended or [None])[0]


def run(argv: Sequence[str], processes: int, *, port: int | None = None,
        on_start: Callable[[int, int], None] | None = None, poll_s: float = 0.05) -> Outcome:
  """Runs `digits <argv>` as `processes` processes of one job and waits for all of them.

  Process 0 writes to this process's stdout; the others' stdout is dropped (they report nothing
  but errors, on stderr). Each runs in its own process group. On the first process to fail, the
  others are given FAILURE_GRACE_S to end by themselves, then SIGTERM, then SIGKILL: none is left
  behind. Ctrl-C here is passed to every process (they save together and exit 130).
  on_start(index, pid) is called as each process starts.
  """
  port = port or free_port()
  children: list[subprocess.Popen] = []
  interrupted = {"at": None}

  def forward(signum, frame):
    interrupted["at"] = interrupted["at"] or time.monotonic()
    for child in children:
      _signal_group(child, signal.SIGINT)

  previous = signal.signal(signal.SIGINT, forward)
  try:
    for index in range(processes):
      env = os.environ | {COORDINATOR_ENV: f"127.0.0.1:{port}",
                          NUM_PROCESSES_ENV: str(processes), PROCESS_ID_ENV: str(index)}
      children.append(subprocess.Popen(
          [sys.executable, "-u", "-m", "flaxdigits.cli.main", *argv], env=env,
          stdout=None if index == 0 else subprocess.DEVNULL, start_new_session=True))
      if on_start:
        on_start(index, children[-1].pid)
    failed, deadline = None, None
    while True:
      codes = [child.poll() for child in children]
      if failed is None:
        failed = first_failure(codes, interrupted=interrupted["at"] is not None)
        if failed is not None:
          deadline = time.monotonic() + FAILURE_GRACE_S
      if all(code is not None for code in codes):
        break
      now = time.monotonic()
      if interrupted["at"] and deadline is None:
        deadline = interrupted["at"] + INTERRUPT_GRACE_S
      if deadline is not None and now > deadline:
        _stop(children)
        break
      time.sleep(poll_s)
  finally:
    signal.signal(signal.SIGINT, previous)
    _stop(children)  # nothing outlives the launcher, whatever ended it
  codes = [child.returncode for child in children]
  if failed is not None:
    code = codes[failed]
    return Outcome(code if code > 0 else 128 - code, failed, describe(code))
  if interrupted["at"]:
    return Outcome(130)
  return Outcome(0)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(child.pid, signum)
  except (ProcessLookupError, PermissionError):
    pass


def _stop(children: list[subprocess.Popen]) -> None:
  """SIGTERM to every live process group, then SIGKILL to what is left after KILL_GRACE_S."""
  live = [child for child in children if child.poll() is None]
  for child in live:
    _signal_group(child, signal.SIGTERM)
  deadline = time.monotonic() + KILL_GRACE_S
  for child in live:
    try:
      child.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(child, signal.SIGKILL)
      child.wait()
