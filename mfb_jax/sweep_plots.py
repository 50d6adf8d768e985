"""GAP against training steps, one line per fusion, like the paper's Fig. 3 (PNG, no display)."""

import contextlib
import os

import matplotlib

matplotlib.use("Agg")  # Files only; sweeps run on machines without a display.
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from configs import paper  # noqa: E402

AGG_NAMES = {"avgpool": "Avgpooling", "netvlad": "NetVLAD", "dbof": "DBoF", "nextvlad": "NeXtVLAD"}


def _color(fusion: str):
  """The same colour for a fusion in every figure."""
  known = list(paper.FUSIONS)
  index = known.index(fusion) if fusion in known else len(known) + sum(map(ord, fusion)) % 5
  return plt.get_cmap("tab10")(index % 10)


def _draw(ax, agg: str, rows: list[dict], with_paper: bool) -> None:
  for row in rows:
    history = row["history"]
    color = _color(row["fusion"])
    steps = [h["step"] for h in history]
    gaps = [100 * h["gap"] for h in history]
    ax.plot(steps, gaps, marker="o", markersize=3, color=color, label=row["fusion"])
    if with_paper and row["paper_gap"] is not None:
      ax.axhline(row["paper_gap"], color=color, linestyle=":", linewidth=1)
  if with_paper and any(row["paper_gap"] is not None for row in rows):
    ax.plot([], [], color="gray", linestyle=":", label="paper, 250k steps")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_title(AGG_NAMES.get(agg, agg))
  ax.set_xlabel("training step")
  ax.set_ylabel("GAP@20 (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", title="fusion", title_fontsize="small")


def _save(fig, path: str) -> str:
  """Writes PATH whole or not at all (a full disk leaves no temporary file)."""
  try:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
  finally:
    plt.close(fig)
    with contextlib.suppress(OSError):
      os.remove(path + ".tmp.png")
  return path


def plot_curves(rows: list[dict], out_dir: str, with_paper: bool = True) -> list[str]:
  """DIR/gap_curves_<agg>.png per aggregation and DIR/gap_curves.png with all of them.

  Dotted lines: the paper's final GAP of the same fusion (after 250k steps on the full data).
  """
  by_agg: dict[str, list[dict]] = {}
  for row in rows:
    if row["history"]:
      by_agg.setdefault(row["aggregation"], []).append(row)
  paths = []
  for agg, agg_rows in by_agg.items():
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _draw(ax, agg, agg_rows, with_paper)
    paths.append(_save(fig, os.path.join(out_dir, f"gap_curves_{agg}.png")))
  if len(by_agg) > 1:
    fig, axes = plt.subplots(1, len(by_agg), figsize=(5 * len(by_agg), 4), squeeze=False)
    for ax, (agg, agg_rows) in zip(axes[0], by_agg.items(), strict=True):
      _draw(ax, agg, agg_rows, with_paper)
    paths.append(_save(fig, os.path.join(out_dir, "gap_curves.png")))
  return paths
