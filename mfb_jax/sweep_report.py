"""A sweep's results: reading cell workdirs, results.md (ours beside the paper) and GAP curves."""

import contextlib
import json
import os

from configs import paper
from mfb_jax import sweep_config, sweep_plots

AGGREGATIONS = paper.AGGREGATORS  # The paper's table order: Tables 1, 2, 3.
FUSIONS = paper.FUSIONS
AGG_NAMES = sweep_plots.AGG_NAMES
FUSION_NAMES = {
  "audio": "Audio Only",
  "video": "Video Only",
  "concat": "Concatenation",
  "fc_concat": "FC + Concatenation",
  "mfb": "MFB",
  "mfh": "MFH",
}
PAPER_SETUP = (
  "Paper (Liu et al. 2018, Tables 1-3): YouTube-8M 2018 frame-level (3862 classes), trained on "
  "3844 train + 3000 validate shards, evaluated on 200 other validate shards, batch 128, "
  "250k steps. Absolute numbers compare only under that recipe; on other data compare the order "
  "of the fusions."
)
_NO_VALUE = "–"


def paper_gap(agg: str, fusion: str) -> float | None:
  """The paper's GAP@20 in percent for a cell, or None for cells the paper did not run."""
  table = paper.PAPER_GAP
  return table.get(f"{agg},{fusion}", table.get((agg, fusion)))


def read_json(path: str) -> dict | None:
  """The JSON object in `path`, or None if it is missing or unreadable (e.g. a partial write)."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def read_result(cell_dir: str) -> dict | None:
  """The cell's last evaluation (eval_results.json; GAP as a fraction)."""
  return read_json(os.path.join(cell_dir, "eval_results.json"))


def read_history(cell_dir: str) -> list[dict]:
  """Every evaluation in eval_history.jsonl, by step; for a repeated step the last line wins."""
  by_step = {}
  try:
    with open(os.path.join(cell_dir, "eval_history.jsonl")) as f:
      lines = f.readlines()
  except OSError:
    return []
  for line in lines:
    try:
      record = json.loads(line)
      by_step[int(record["step"])] = record
    except (ValueError, KeyError, TypeError):
      continue  # A line cut short by a kill; the next evaluation writes a whole one.
  return [by_step[s] for s in sorted(by_step)]


def cell_state(cell_dir: str, steps: int) -> str:
  """'done' (evaluated at `steps`), 'todo' (nothing yet, or resumable), else why it cannot run."""
  result = read_result(cell_dir)
  if result is None or result.get("step", 0) < steps:
    return "todo"
  if result["step"] == steps:
    return "done"
  return (
    f"{cell_dir} is already trained to step {result['step']} > --steps={steps}; "
    "use another --workdir or remove that cell's directory"
  )


def _row(agg: str, fusion: str, cell_dir: str, steps: int | None, outcome: dict | None) -> dict:
  result = read_result(cell_dir)
  config = read_json(os.path.join(cell_dir, "config.json")) or {}
  target = steps if steps is not None else config.get("train", {}).get("num_steps")
  if outcome is not None:
    status = outcome["status"]
    if status == "failed":  # What its directory holds is not this sweep's result.
      result = None
  elif result is not None and result.get("step") == target:
    status = "done"
  else:
    status = "partial" if result is not None else "not run"
  return {
    "aggregation": agg,
    "fusion": fusion,
    "status": status,
    "error": (outcome or {}).get("error", ""),
    "result": result,
    "paper_gap": paper_gap(agg, fusion),
    "batch_size": config.get("train", {}).get("batch_size"),
    "history": read_history(cell_dir),
  }


def collect(sweep, outcomes: dict) -> list[dict]:
  """Rows for this sweep's cells, plus cells that earlier sweeps left in the same directory."""
  rows = [
    _row(a, f, sweep.cell_dir(a, f), sweep.steps, outcomes.get((a, f))) for a, f in sweep.cells
  ]
  return rows + [_row(a, f, d, None, None) for a, f, d in _earlier_cells(sweep)]


def _earlier_cells(sweep) -> list[tuple[str, str, str]]:
  """(aggregation, fusion, directory) of the evaluated cells in sweep.workdir that are not this
  sweep's, whatever their names (NeXtVLAD, MFH or a user's module): each cell's config.json says
  which model it trained."""
  found = []
  for name in sorted(os.listdir(sweep.workdir)) if os.path.isdir(sweep.workdir) else []:
    cell_dir = os.path.join(sweep.workdir, name)
    model = (read_json(os.path.join(cell_dir, "config.json")) or {}).get("model")
    if not isinstance(model, dict) or read_result(cell_dir) is None:
      continue
    agg, fusion = str(model.get("aggregator")), str(model.get("fusion"))
    if cell_dir == sweep.cell_dir(agg, fusion) and (agg, fusion) not in sweep.cells:
      found.append((agg, fusion, cell_dir))
  order = {(a, f): i for i, (a, f) in enumerate((a, f) for a in AGGREGATIONS for f in FUSIONS)}
  return sorted(found, key=lambda c: (order.get(c[:2], len(order)), c[:2]))


def _ordered(names, known) -> list[str]:
  names = list(dict.fromkeys(names))
  return [n for n in known if n in names] + [n for n in names if n not in known]


def _ours(row: dict) -> str:
  if row["status"] == "failed":
    return "failed"
  if row["result"] is None:
    return _NO_VALUE
  mark = "" if row["status"] == "done" else "*"
  return f"{100 * row['result']['gap']:.2f}{mark}"


def _paper(row: dict) -> str:
  return _NO_VALUE if row["paper_gap"] is None else f"{row['paper_gap']:.1f}"


def _grid(rows: list[dict]) -> list[str]:
  aggs = _ordered([r["aggregation"] for r in rows], AGGREGATIONS)
  fusions = _ordered([r["fusion"] for r in rows], FUSIONS)
  cells = {(r["aggregation"], r["fusion"]): r for r in rows}
  lines = [
    "| aggregation | " + " | ".join(FUSION_NAMES.get(f, f) for f in fusions) + " |",
    "|---|" + "---:|" * len(fusions),
  ]
  for agg in aggs:
    texts = []
    for fusion in fusions:
      row = cells.get((agg, fusion))
      texts.append(f"{_ours(row)} / {_paper(row)}" if row else _NO_VALUE)
    lines.append(f"| {AGG_NAMES.get(agg, agg)} | " + " | ".join(texts) + " |")
  return lines


def _percent(result: dict | None, key: str) -> str:
  return _NO_VALUE if result is None else f"{100 * result[key]:.2f}"


def _detail(rows: list[dict], agg: str) -> list[str]:
  table = dict(zip(AGGREGATIONS, (1, 2, 3), strict=True)).get(agg)
  title = f"Table {table}: " if table else ""
  lines = [
    f"### {title}{AGG_NAMES.get(agg, agg)}",
    "",
    "| Model | GAP ours | GAP paper | ours - paper | mAP | Hit@1 | PERR | step | batch | videos |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  order = _ordered([r["fusion"] for r in rows], FUSIONS)
  for row in sorted(rows, key=lambda r: order.index(r["fusion"])):
    res = row["result"]
    delta = _NO_VALUE
    if res is not None and row["paper_gap"] is not None:
      delta = f"{100 * res['gap'] - row['paper_gap']:+.1f}"
    model = f"{AGG_NAMES.get(agg, agg)} + {FUSION_NAMES.get(row['fusion'], row['fusion'])}"
    cols = [model, _ours(row), _paper(row), delta]
    cols += [_percent(res, k) for k in ("map", "hit_at_1", "perr")]
    cols += [str(res["step"]) if res else _NO_VALUE, str(row["batch_size"] or _NO_VALUE)]
    cols.append(str(res["num_examples"]) if res else _NO_VALUE)
    lines.append("| " + " | ".join(cols) + " |")
  return lines


def _ranking(rows: list[dict], agg: str) -> str:
  ours = [r for r in rows if r["aggregation"] == agg and r["result"] is not None]
  mine = " > ".join(r["fusion"] for r in sorted(ours, key=lambda r: -r["result"]["gap"]))
  theirs = [r for r in ours if r["paper_gap"] is not None]
  paper_order = " > ".join(r["fusion"] for r in sorted(theirs, key=lambda r: -r["paper_gap"]))
  return f"- {AGG_NAMES.get(agg, agg)}: ours {mine or _NO_VALUE}; paper {paper_order or _NO_VALUE}"


def format_markdown(rows: list[dict], meta: dict, runs: list[dict] = ()) -> str:
  """results.md: the grid (ours / paper), one table per aggregation, the setup and the commands."""
  label = meta.get("data_label") or "(no --data_label given)"
  lines = [
    "# mfb-jax sweep: GAP@20 (%) against the paper",
    "",
    f"Data: {label}. Train `{meta['train_pattern']}`, eval `{meta['eval_pattern']}` "
    f"({meta['data_format']}-level, {meta['num_classes']} classes). {meta['steps']} steps, "
    f"batch {meta['batch_size']}, eval every {meta['eval_every']} steps. Date: {meta['date']}.",
    "",
    "Each cell: ours / paper. * = not yet at the target step; failed = see Failures below.",
    "",
    *_grid(rows),
    "",
    PAPER_SETUP,
    "",
    "Fusions from best to worst GAP:",
    "",
  ]
  aggs = _ordered([r["aggregation"] for r in rows], AGGREGATIONS)
  lines += [_ranking(rows, agg) for agg in aggs] + [""]
  for agg in aggs:
    lines += _detail([r for r in rows if r["aggregation"] == agg], agg) + [""]
  failures = [r for r in rows if r["status"] == "failed"]
  if failures:
    lines += ["## Failures", ""]
    lines += [f"- {r['aggregation']},{r['fusion']}: {r['error']}" for r in failures] + [""]
  lines += ["## Setup", "", f"- config: `{meta['config_path']}:AGG,FUSION`"]
  lines.append(f"- overrides: {', '.join(f'`{o}`' for o in meta['overrides']) or 'none'}")
  lines += ["", "Command that wrote this file:", "", "```", meta["command"], "```", ""]
  if runs:
    lines += ["Every sweep run in this directory:", ""]
    lines += [f"- {run['date']}: `{run['command']}`" for run in runs] + [""]
  return "\n".join(lines)


def _runs(workdir: str) -> list[dict]:
  path = os.path.join(workdir, sweep_config.RUNS_FILE)
  if not os.path.exists(path):
    return []
  runs = []
  with open(path) as f:
    for line in f:
      with contextlib.suppress(ValueError):  # A line cut short by a full disk or a kill.
        runs.append(json.loads(line))
  return [run for run in runs if isinstance(run, dict)]


def write_report(sweep, outcomes: dict) -> list[str]:
  """Writes DIR/results.md, DIR/results.json and the GAP curves; returns their paths. A failed
  write (a full disk) is a WorkdirError, one line naming the file."""
  from mfb_jax import workdir_files  # Deferred: imports JAX.

  rows = collect(sweep, outcomes)
  meta = sweep.meta()
  paths = []
  for name, text in (
    ("results.md", format_markdown(rows, meta, _runs(sweep.workdir))),
    ("results.json", json.dumps({"meta": meta, "cells": rows}, indent=1)),
  ):
    path = os.path.join(sweep.workdir, name)
    with workdir_files.write_errors(path):
      try:
        with open(path + ".tmp", "w") as f:
          f.write(text)
        os.replace(path + ".tmp", path)
      finally:
        with contextlib.suppress(OSError):
          os.remove(path + ".tmp")
    paths.append(path)
  with workdir_files.write_errors(os.path.join(sweep.workdir, "gap_curves_*.png")):
    return paths + sweep_plots.plot_curves(rows, sweep.workdir)


def summary_lines(sweep, outcomes: dict) -> str:
  """A short terminal table: one line per cell of this sweep."""
  lines = [f"{'cell':<22} {'status':<12} {'GAP ours':>9} {'paper':>6}"]
  for row in collect(sweep, outcomes)[: len(sweep.cells)]:
    name = f"{row['aggregation']},{row['fusion']}"
    lines.append(f"{name:<22} {row['status']:<12} {_ours(row):>9} {_paper(row):>6}")
  return "\n".join(lines)
