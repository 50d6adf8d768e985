"""How much memory this process can get (available_memory.py): MemAvailable, capped by the
cgroup's limit less its use (inactive page cache counted as free), and what tcmalloc keeps."""

import pytest
from conftest import run_python

from mfb_jax import available_memory, runtime


def _fake_system(tmp_path, monkeypatch, meminfo_kb: int, cgroup) -> None:
  """/proc/meminfo, /proc/self/cgroup and the cgroup mount, as files under tmp_path. cgroup:
  None, or (version, limit, usage, inactive page cache) of this process's cgroup /job/42."""
  meminfo = tmp_path / "meminfo"
  meminfo.write_text(f"MemTotal:  99999999 kB\nMemFree:  1 kB\nMemAvailable:  {meminfo_kb} kB\n")
  monkeypatch.setattr(available_memory, "_MEMINFO", str(meminfo))
  monkeypatch.setattr(available_memory, "_CGROUP_MOUNT", str(tmp_path / "cg"))
  proc = tmp_path / "proc_self_cgroup"
  monkeypatch.setattr(available_memory, "_PROC_CGROUP", str(proc))
  if cgroup is None:
    proc.write_text("0::/\n")  # The root of a cgroup v2 hierarchy: no limit files.
    return
  version, limit, usage, inactive = cgroup
  if version == 2:
    proc.write_text("0::/job/42\n")
    directory, names = tmp_path / "cg" / "job" / "42", ("memory.max", "memory.current")
    stat = f"anon 5\ninactive_file {inactive}\nactive_file 7\n"
  else:
    proc.write_text("12:pids:/job/42\n4:memory:/job/42\n")
    directory = tmp_path / "cg" / "memory" / "job" / "42"
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    stat = f"cache 9\ninactive_file 1\ntotal_inactive_file {inactive}\n"
  directory.mkdir(parents=True)
  (directory / names[0]).write_text(f"{limit}\n")
  (directory / names[1]).write_text(f"{usage}\n")
  (directory / "memory.stat").write_text(stat)


@pytest.mark.parametrize(
  "meminfo_kb, cgroup, expected",
  [
    (1000, None, 1_024_000),  # No cgroup limit: the host's MemAvailable.
    (1000, (2, "max", "5", 0), 1_024_000),  # A cgroup without a limit.
    (1000, (2, "500000", "100000", 0), 400_000),  # A cgroup limit below MemAvailable.
    (100, (2, "500000", "100000", 0), 102_400),  # MemAvailable below the cgroup's room.
    (1000, (2, "100", "500", 0), 0),  # Over its limit already.
    # At its limit after reading files: the inactive page cache is reclaimed first.
    (1000, (2, "500000", "500000", 300000), 300_000),
    (1000, (1, "500000", "500000", 300000), 300_000),
    (1000, (1, str(2**63 - 4096), "500000", 0), 1_024_000),  # v1's "no limit".
  ],
)
def test_the_host_has_what_meminfo_and_the_cgroup_both_allow(
  tmp_path, monkeypatch, meminfo_kb, cgroup, expected
):
  _fake_system(tmp_path, monkeypatch, meminfo_kb, cgroup)
  assert available_memory.host_available() == expected


_RELEASE = """
import numpy as np
from mfb_jax import available_memory, runtime

def resident():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096

assert runtime.tcmalloc_loaded()
for _ in range(3):  # Freed buffers of a step's sizes, which tcmalloc keeps for reuse.
  buffers = [np.ones(25_000_000 + 1000 * i, np.float32) for i in range(20)]
  del buffers
kept = resident()
available_memory.release_free_memory()
print((kept - resident()) / 1e9)
"""


@pytest.mark.skipif(runtime.tcmalloc_library() is None, reason="tcmalloc is not installed")
def test_memory_tcmalloc_keeps_from_freed_buffers_is_counted_as_available():
  library = runtime.tcmalloc_library()
  result = run_python(["-c", _RELEASE], env={"LD_PRELOAD": library}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.split()[-1]) > 1.0  # Of the last round's 2 GB, kept until released.
