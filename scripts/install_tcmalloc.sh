#!/usr/bin/env bash
# Best effort: install Debian's tcmalloc (libtcmalloc-minimal4). launch.py preloads it when present
# because glibc's per-step mmap of large fresh buffers costs 15-33% of a train step on CPU
# (BENCHMARKS.md). Without it everything still works, only slower.
set -u
for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4; do
  [ -e "$lib" ] && exit 0
done
command -v apt-get >/dev/null 2>&1 || { echo "[setup] no apt-get: running without tcmalloc"; exit 0; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
echo "[setup] installing libtcmalloc-minimal4 (faster host allocator)"
if ! $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
    || echo "[setup] could not install libtcmalloc-minimal4: running without it"
fi
exit 0
