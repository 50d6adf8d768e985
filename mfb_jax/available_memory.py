"""How much memory this process can still get: on the host (MemAvailable, capped by its cgroup's
limit, after the allocator hands back freed buffers) and on each accelerator."""

import ctypes
import os

_MEMINFO = "/proc/meminfo"
_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_MOUNT = "/sys/fs/cgroup"


def _field(path: str, key: str) -> int | None:
  """The number after `key` on its line of /proc/meminfo or a cgroup's memory.stat, or None
  where the file or the line is missing."""
  try:
    with open(path) as f:
      for line in f:
        words = line.split()
        if words and words[0] == key:
          return int(words[1])
  except (OSError, ValueError, IndexError):
    pass
  return None


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
    return None if text == "max" else int(text)
  except (OSError, ValueError):
    return None


def _cgroup_dirs() -> list[tuple[str, str, str, str]]:
  """(directory, limit file, usage file, inactive-cache key) of this process's memory cgroup, v2
  ('0::/path') or v1 ('N:...memory...:/path'), as /proc/self/cgroup names it."""
  found = []
  try:
    with open(_PROC_CGROUP) as f:
      lines = f.read().splitlines()
  except OSError:
    return found
  for line in lines:
    number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
    if number == "0" and controllers == "":
      found.append((f"{_CGROUP_MOUNT}{path}", "memory.max", "memory.current", "inactive_file"))
    elif "memory" in controllers.split(","):
      where = f"{_CGROUP_MOUNT}/memory{path}"
      found.append((where, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
  return found


def _cgroup_available() -> int | None:
  """What this process's memory cgroup allows beyond its current use, if it has a limit. The
  usage counts the page cache, of which the inactive part is reclaimed before anything is
  killed: a container that has read more tfrecords than its limit sits at its limit."""
  for directory, limit, usage, inactive in _cgroup_dirs():
    cap = _read_int(os.path.join(directory, limit))
    used = _read_int(os.path.join(directory, usage))
    if cap is not None and used is not None and cap < 1 << 60:  # v1 writes ~2^63 for "none".
      cache = _field(os.path.join(directory, "memory.stat"), inactive) or 0
      return max(cap - max(used - cache, 0), 0)
  return None


def release_free_memory() -> None:
  """Hands the memory this process's allocator keeps from freed buffers back to the system, so
  that the host's count includes it: tcmalloc keeps gigabytes of a step's freed temporaries for
  the next step; glibc keeps the top of its heap."""
  process = ctypes.CDLL(None)
  for name in ("MallocExtension_ReleaseFreeMemory", "malloc_trim"):  # tcmalloc, else glibc.
    release = getattr(process, name, None)
    if release is not None:
      release(*([0] if name == "malloc_trim" else []))
      return


def host_available() -> int | None:
  """Bytes the host can still give this process: MemAvailable (after handing back what the
  allocator keeps), capped by a cgroup limit."""
  release_free_memory()
  meminfo = _field(_MEMINFO, "MemAvailable:")  # In kB.
  meminfo = None if meminfo is None else meminfo * 1024
  known = [b for b in (meminfo, _cgroup_available()) if b is not None]
  return min(known) if known else None


def device_available(device) -> int | None:
  """Bytes left on `device`: the host's for a CPU, else the allocator's limit less its use."""
  if device.platform == "cpu":
    return host_available()
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - a backend without memory statistics: nothing to check.
    return None
  if "bytes_limit" not in stats:
    return None
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
