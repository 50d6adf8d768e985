"""Multi-process start-up: cluster detection, the coordinator's address and port, and the
time-out for partners that never connect."""

import socket

import pytest
from conftest import free_port, last_line, launch

from mfb_jax import cluster
from mfb_jax.errors import ConfigError


def test_clusters_are_detected_from_their_environment(monkeypatch):
  for key in cluster.CLUSTER_ENV:
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setattr(cluster, "cloud_tpu_vm", lambda: False)
  assert not cluster.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")  # A one-task SLURM job is no cluster.
  assert not cluster.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert cluster.cluster_detected()
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  assert cluster.cluster_detected()
  monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
  monkeypatch.setattr(cluster, "cloud_tpu_vm", lambda: True)
  assert cluster.cluster_detected()


@pytest.mark.parametrize(
  "has_libtpu, devices, expected",
  [(False, ["/dev/accel0"], False), (True, [], False), (True, ["/dev/accel0"], True)],
)
def test_a_cloud_tpu_vm_needs_libtpu_and_tpu_devices(monkeypatch, has_libtpu, devices, expected):
  import glob
  from importlib import util

  monkeypatch.setattr(util, "find_spec", lambda name: object() if has_libtpu else None)
  monkeypatch.setattr(glob, "glob", lambda pattern: list(devices))
  assert cluster.cloud_tpu_vm() is expected


def test_a_coordinator_address_needs_a_port():
  assert cluster.coordinator_port("host0:1234") == 1234
  assert cluster.coordinator_port("[::1]:80") == 80
  for bad in ("host0", "host0:", ":1234", "host0:0", "host0:65536", "host0:http"):
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
      cluster.coordinator_port(bad)


def test_a_busy_coordinator_port_is_refused_before_jax_starts(tmp_path):
  with socket.socket() as busy:  # Another program listening there, on one interface only.
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ConfigError, match=f"port {port} is in use on this host"):
      cluster.check_port_free(f"127.0.0.1:{port}", port)
    # Through launch.py: JAX's coordinator crashed on it (exit 139).
    args = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0"]
    result = launch(tmp_path, "--config=configs/tiny.py", "--mode=bench", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert last_line(result.stderr).startswith("error: --coordinator_address=127.0.0.1:")
  assert "Traceback" not in result.stderr
  cluster.check_port_free(f"127.0.0.1:{port}", port)  # Free again.


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_partner_that_never_connects_is_one_line_at_the_time_out(tmp_path, process_id):
  # Alone, each side waited 300 s in jax.distributed.initialize, then JAX aborted (exit 134).
  address = f"127.0.0.1:{free_port()}"
  args = [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={process_id}"]
  env = {"MFB_JAX_INIT_TIMEOUT_S": "5"}
  result = launch(tmp_path, "--config=configs/tiny.py", "--mode=bench", *args, env=env)
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_line(result.stderr) == (
    f"error: not every process of this run reached the coordinator at {address} within 5 s: "
    "start all of them with the same --coordinator_address and --num_processes, each with its "
    "own --process_id (MFB_JAX_INIT_TIMEOUT_S=SECONDS waits longer)"
  )


def test_the_start_up_time_out_is_checked(monkeypatch):
  monkeypatch.delenv("MFB_JAX_INIT_TIMEOUT_S", raising=False)
  assert cluster.init_timeout_s() == cluster.INIT_TIMEOUT_S == 300
  monkeypatch.setenv("MFB_JAX_INIT_TIMEOUT_S", "900")
  assert cluster.init_timeout_s() == 900
  for bad in ("abc", "2", "-5", ""):
    monkeypatch.setenv("MFB_JAX_INIT_TIMEOUT_S", bad)
    with pytest.raises(ConfigError, match=f"MFB_JAX_INIT_TIMEOUT_S='{bad}' must be a whole"):
      cluster.init_timeout_s()


def test_flags_of_a_several_process_run_left_out_are_named(monkeypatch):
  # JAX's own lines ("coordinator_address should be defined.") named no flag of ours.
  monkeypatch.setattr(cluster, "cluster_detected", lambda: False)
  with pytest.raises(ConfigError, match=r"^--coordinator_address and --process_id missing: "):
    cluster.init_distributed(None, 2, None)
  with pytest.raises(ConfigError, match=r"^--num_processes and --process_id missing: "):
    cluster.init_distributed("127.0.0.1:1234", None, None)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")  # Read by JAX itself.
  with pytest.raises(ConfigError, match=r"^--process_id missing: "):
    cluster.init_distributed(None, 2, None)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  cluster.init_distributed(None, None, None)  # One process: nothing to start, nothing missing.
  cluster.init_distributed(None, 1, None)


@pytest.mark.parametrize(("identities", "expected"), [(["a", "b", "a", "c"], 2), (["a", "b"], 1)])
def test_the_processes_on_this_host_are_those_with_its_identity(monkeypatch, identities, expected):
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from mfb_jax import workdir_files

  every = np.stack([workdir_files.digest(i.encode()) for i in identities])
  monkeypatch.setattr(jax, "process_count", lambda: len(identities))
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda mine: every)
  monkeypatch.setattr(cluster, "host_identity", lambda: "a")
  monkeypatch.setattr(cluster, "_host_processes", 1)
  assert cluster.count_host_processes() == expected == cluster.host_processes()


def test_a_host_identity_is_its_boot_its_name_and_its_cgroup(monkeypatch, tmp_path):
  boot, cgroup = tmp_path / "boot_id", tmp_path / "cgroup"
  boot.write_text("1234-abcd\n")
  cgroup.write_text("0::/job/42\n")
  monkeypatch.setattr(cluster, "_BOOT_ID", str(boot))
  monkeypatch.setattr(cluster, "_PROC_CGROUP", str(cgroup))
  assert cluster.host_identity() == f"1234-abcd/{socket.gethostname()}/0::/job/42"
  monkeypatch.setattr(cluster, "_BOOT_ID", str(tmp_path / "none"))
  assert cluster.host_identity() == f"/{socket.gethostname()}/0::/job/42"


def test_processes_with_different_numbers_of_devices_are_named(monkeypatch):
  # Hosts of different sizes (or XLA_FLAGS on one only) stopped with "error: cannot reshape
  # array of size 5 into shape (2,2)" from the config check's gather, on both processes.
  import types

  import jax

  devices = [types.SimpleNamespace(process_index=i) for i in (0, 0, 1, 1, 1)]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "devices", lambda: devices)
  with pytest.raises(ConfigError) as raised:
    cluster.check_same_config(config=None)  # Checked before the config is read.
  assert str(raised.value) == (
    "the processes of this run have different numbers of devices (2 in process 0, 3 in process "
    "1): every process needs the same number (the same XLA_FLAGS, or as many visible "
    "accelerators, on each host)"
  )


def test_the_shared_workdir_wait_is_checked(monkeypatch):
  monkeypatch.delenv("MFB_JAX_SHARED_WORKDIR_WAIT_S", raising=False)
  assert cluster.shared_workdir_wait_s() == cluster.SHARED_WORKDIR_WAIT_S == 10
  monkeypatch.setenv("MFB_JAX_SHARED_WORKDIR_WAIT_S", "0.5")
  assert cluster.shared_workdir_wait_s() == 0.5
  # 'abc' was an error naming no variable, in every run; 'nan' or 'inf' hung two processes
  # given different workdirs for good.
  for bad in ("abc", "nan", "inf", "-1", "", "3601"):
    monkeypatch.setenv("MFB_JAX_SHARED_WORKDIR_WAIT_S", bad)
    with pytest.raises(ConfigError, match=f"^MFB_JAX_SHARED_WORKDIR_WAIT_S='{bad}' must be a num"):
      cluster.shared_workdir_wait_s()
