"""Multi-process runs: starting JAX's distributed runtime (flags or a detected cluster), the
start-up time-out, the coordinator's port, the same-config check, the processes sharing a host,
and leaving the cluster.

Like runtime.py, nothing heavy is imported at import time.
"""

import collections
import contextlib
import os
import sys
import threading

# Environment variables that show a multi-process cluster jax.distributed.initialize() can detect.
CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID")
# How long the processes of a run wait for each other at start-up (JAX's default);
# MFB_JAX_INIT_TIMEOUT_S changes it (a scheduler that starts them minutes apart needs more).
INIT_TIMEOUT_S = 300
# How long each process looks for process 0's training-lock file in the workdir;
# MFB_JAX_SHARED_WORKDIR_WAIT_S changes it (shared_workdir_wait_s).
SHARED_WORKDIR_WAIT_S = 10
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_PROC_CGROUP = "/proc/self/cgroup"
_host_processes = 1  # Processes of this run on this host: count_host_processes() sets it.


def cloud_tpu_vm() -> bool:
  """Whether this looks like a Cloud TPU VM: libtpu installed and TPU chips present (/dev/accel*
  on v2-v4, /dev/vfio on v5 and later). There jax.distributed.initialize() finds the other hosts
  itself, through the VM's metadata server."""
  import glob
  from importlib import util

  if util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*")) or bool(glob.glob("/dev/vfio/[0-9]*"))


def cluster_detected() -> bool:
  """Whether the environment describes a multi-process job (SLURM, MPI, Cloud TPU)."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return any(os.environ.get(k) for k in CLUSTER_ENV if k != "SLURM_NTASKS") or cloud_tpu_vm()


def init_distributed(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Starts JAX's multi-process runtime when asked to (flags) or when a cluster is detected."""
  import jax

  explicit, detected = coordinator_address or (num_processes or 1) > 1, cluster_detected()
  if not explicit and not detected:
    return
  flags = {  # JAX also reads the coordinator's address from JAX_COORDINATOR_ADDRESS.
    "--coordinator_address": coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  missing = [flag for flag, value in flags.items() if value is None]
  if explicit and missing and not detected:  # JAX said "should be defined", unnamed.
    from mfb_jax.errors import ConfigError

    raise ConfigError(
      f"{' and '.join(missing)} missing: a run of several processes needs --coordinator_address="
      "HOST:PORT and --num_processes=N on every process, each with its own --process_id (no "
      "SLURM, MPI or TPU VM cluster was detected to give them)"
    )
  timeout = init_timeout_s()
  shared_workdir_wait_s()  # Checked now: the training lock reads it after the processes met.
  # Cross-process collectives on CPU need gloo; accelerators ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if not explicit:
    hint = "every process the cluster's job (SLURM, MPI, TPU VM) describes must start"
    with _connect_watchdog(timeout, "the coordinator", hint):
      jax.distributed.initialize(initialization_timeout=timeout + 5)
    return
  if coordinator_address and process_id is not None and num_processes is not None:
    port = coordinator_port(coordinator_address)
    if process_id == 0:  # Process 0 runs the coordinator: JAX crashed (exit 139) on a busy port.
      check_port_free(coordinator_address, port)
    from absl import logging

    logging.info(
      "Process %d of %d: connecting to the coordinator at %s (JAX waits up to %d s for all)",
      process_id,
      num_processes,
      coordinator_address,
      timeout,
    )
  where = f"the coordinator at {coordinator_address}" if coordinator_address else "the coordinator"
  hint = (
    "start all of them with the same --coordinator_address and --num_processes, each with its "
    "own --process_id"
  )
  with _connect_watchdog(timeout, where, hint):
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout + 5,  # Ours (the watchdog) comes first.
    )


def init_timeout_s() -> int:
  """Seconds the processes wait for each other at start-up: MFB_JAX_INIT_TIMEOUT_S or 300."""
  from mfb_jax.errors import ConfigError

  value = os.environ.get("MFB_JAX_INIT_TIMEOUT_S", str(INIT_TIMEOUT_S))
  if not value.isdigit() or int(value) < 5:
    raise ConfigError(f"MFB_JAX_INIT_TIMEOUT_S={value!r} must be a whole number of seconds >= 5")
  return int(value)


def shared_workdir_wait_s() -> float:
  """Seconds each process looks for process 0's training-lock file in the workdir (a slow network
  file system may need more): MFB_JAX_SHARED_WORKDIR_WAIT_S or 10."""
  from mfb_jax.errors import ConfigError

  value = os.environ.get("MFB_JAX_SHARED_WORKDIR_WAIT_S", str(SHARED_WORKDIR_WAIT_S))
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if not 0 <= seconds <= 3600:  # NaN included.
    raise ConfigError(
      f"MFB_JAX_SHARED_WORKDIR_WAIT_S={value!r} must be a number of seconds from 0 to 3600"
    )
  return seconds


@contextlib.contextmanager
def _connect_watchdog(timeout: int, where: str, hint: str):
  """Ends the process with one line (exit 1) if jax.distributed.initialize has not returned after
  `timeout` s (JAX's own time-out is set 5 s later): a partner that never connects (killed at
  start-up, a --process_id given twice, a wrong address) ended it with JAX's fatal-error dump
  (exit 134), which Python cannot catch. Nothing has been written by then: the workdir is only
  checked before this."""
  lock, returned = threading.Lock(), []

  def give_up():
    with lock:  # Held to the exit: an initialize that returns now waits for it, and vice versa.
      if returned:
        return
      with contextlib.suppress(Exception):
        sys.stdout.flush()
        print(
          f"error: not every process of this run reached {where} within {timeout} s: {hint} "
          "(MFB_JAX_INIT_TIMEOUT_S=SECONDS waits longer)",
          file=sys.stderr,
          flush=True,
        )
      os._exit(1)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    yield
  finally:
    with lock:
      returned.append(True)
    watchdog.cancel()


def leave_cluster() -> None:
  """jax.distributed.shutdown() where it was initialized (else nothing): its barrier waits for
  every process to finish; it would otherwise run at the interpreter's exit."""
  import jax

  if jax.process_count() > 1:
    jax.distributed.shutdown()


def coordinator_port(address: str) -> int:
  """The port of --coordinator_address=HOST:PORT; ConfigError if it has none."""
  from mfb_jax.errors import ConfigError

  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(
      f"--coordinator_address={address}: expected HOST:PORT with a port in 1..65535 "
      "(process 0 runs the coordinator there), e.g. --coordinator_address=host0:1234"
    )
  return int(port)


def check_port_free(address: str, port: int) -> None:
  """ConfigError if this host cannot listen on `port` (JAX's coordinator binds every interface)."""
  import errno
  import socket

  from mfb_jax.errors import ConfigError

  family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
  try:
    probe = socket.socket(family, socket.SOCK_STREAM)
  except OSError:  # No IPv6 on this host after all.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  with probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As gRPC: TIME_WAIT is fine.
    try:
      probe.bind(("::" if probe.family == socket.AF_INET6 else "", port))
    except OSError as e:
      why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
      raise ConfigError(
        f"--coordinator_address={address}: port {port} {why} on this host, where process 0 "
        "runs the coordinator (by another program, or by a process also given --process_id=0); "
        "pick a free port for every process of the run"
      ) from e


def check_same_config(config) -> None:
  """Raises ConfigError on every process of a multi-process run whose processes were given
  different configs (a batch size or a model on one command line only): they trained on with
  unequal batches, or crashed in a collective without a word on why. Data paths may differ.
  Also where the processes have different numbers of devices (the gathers fail on it with
  "cannot reshape array of size 5 into shape (2,2)")."""

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from mfb_jax import workdir_files
  from mfb_jax.errors import ConfigError

  if jax.process_count() == 1:
    return
  # Read from the global device list, with no collective: the gathers below assume it.
  devices = collections.Counter(d.process_index for d in jax.devices())
  if len(set(devices.values())) > 1:
    counts = ", ".join(f"{n} in process {i}" for i, n in sorted(devices.items()))
    raise ConfigError(
      f"the processes of this run have different numbers of devices ({counts}): every process "
      "needs the same number (the same XLA_FLAGS, or as many visible accelerators, on each host)"
    )
  leaves = sorted(workdir_files.flat_hparams(config).items())
  leaves = [(k, v) for k, v in leaves if not k.endswith(("_pattern", "vocabulary"))]
  digest = lambda text: workdir_files.digest(text.encode())
  names = digest(repr([k for k, _ in leaves]))
  same_fields = multihost_utils.process_allgather(names)
  if (same_fields != same_fields[:1]).any():
    raise ConfigError("the processes of this run were given configs with different fields")
  values = np.stack([digest(repr(v)) for _, v in leaves])
  all_values = multihost_utils.process_allgather(values)  # [processes, fields, 8]
  differs = (all_values != all_values[:1]).any(axis=(0, 2))
  if differs.any():
    fields = ", ".join(f"config.{k}" for (k, _), d in zip(leaves, differs, strict=True) if d)
    raise ConfigError(
      f"the processes of this run were given different values of {fields}: every "
      "process needs the same --config and overrides"
    )


def host_identity() -> str:
  """The memory this process shares, as its processes can tell it: the kernel's boot id (the
  same in every container on one machine, different on every other machine), the host name and
  the cgroup (different in most containers, whose memory limits differ too). Containers with the
  host's name (host networking) and cgroups of their own that look alike from inside still count
  as one: their processes' memory is then counted together."""
  import socket

  def read(path: str) -> str:
    try:
      with open(path) as f:
        return f.read().strip()
    except OSError:
      return ""

  return f"{read(_BOOT_ID)}/{socket.gethostname()}/{read(_PROC_CGROUP)}"


def count_host_processes() -> int:
  """How many processes of this run share this process's host (1 in a one-process run), found
  once at start-up: on a CPU they share the host's memory, and memory.py's checks count them
  together."""
  global _host_processes

  import jax
  from jax.experimental import multihost_utils

  from mfb_jax import workdir_files

  if jax.process_count() > 1:
    mine = workdir_files.digest(host_identity().encode())
    every = multihost_utils.process_allgather(mine)  # [processes, 8]
    _host_processes = int((every == mine).all(axis=1).sum())
  return _host_processes


def host_processes() -> int:
  """The processes of this run on this host, as count_host_processes() found (1 before)."""
  return _host_processes
