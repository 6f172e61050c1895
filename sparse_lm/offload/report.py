"""One result record from a sweep of experiments/place.py (budget x solver x hardware): objectives, solve times
and projected tokens/s per policy, for the PowerInfer Fig. 10-style figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sparse_lm.results import write_result
from sparse_lm.roofline.hardware import get_profile

COLUMNS = (
    "hardware", "solver", "budget_gib", "capacity_neurons", "min_neurons", "objective", "objective_greedy",
    "solve_seconds", "fast_firing_share", "tokens_per_s_powerinfer", "tokens_per_s_layer_split",
    "tokens_per_s_flexgen", "tokens_per_s_all_fast", "all_fast_fits", "speedup_over_layer_split",
)


def sweep_rows(sweep_dir: str | Path) -> list[list]:
    """A row per finished run (a folder with summary.json) under `sweep_dir`, sorted by hardware, solver, budget."""
    runs = sorted(Path(sweep_dir).glob("*/summary.json"))
    if not runs:
        raise FileNotFoundError(f"no finished run (summary.json) under {sweep_dir}")
    rows = []
    for path in runs:
        s = json.loads(path.read_text())
        if "projected_tokens_per_s" not in s:
            raise ValueError(f"{path}: a placement run without hardware has no projection to collect")
        rows.append([
            s["hardware"], s["solver"], s["budget_bytes"] / 2**30, s["capacity_neurons"], s["min_neurons"],
            s["objective"], s["objective_greedy"], s["solve_seconds"], s["fast_firing_share"],
            s["projected_tokens_per_s"], s["projected_tokens_per_s_layer_split"], s["projected_tokens_per_s_flexgen"],
            s["projected_tokens_per_s_all_fast"], s["all_fast_fits"], s["projected_speedup_over_layer_split"],
        ])
    return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def collect_place_sweep(sweep_dir: str | Path, record_as: str, results_dir: str | Path, command: str) -> Path:
    """`results/<record_as>.json` from a placement sweep."""
    rows = sweep_rows(sweep_dir)
    first = json.loads(next(Path(sweep_dir).glob("*/summary.json")).read_text())
    ilp = {(r[0], r[2]): r for r in rows if r[1] == "ilp"}
    greedy = {(r[0], r[2]): r for r in rows if r[1] == "greedy"}
    both = sorted(set(ilp) & set(greedy))
    metrics = {
        "model_shape": first["model_shape"],
        "configurations": len(rows),
        "ilp_never_below_greedy": all(ilp[k][5] >= greedy[k][5] - 1e-9 for k in both),
        "ilp_gain_over_greedy_max": max((ilp[k][5] / greedy[k][5] - 1 for k in both if greedy[k][5] > 0),
                                        default=math.nan),
        "solve_seconds_max": max(r[7] for r in rows),
    }
    for hardware in sorted({r[0] for r in rows}):
        # the largest budget the machine's own GPU holds (larger budgets are what-ifs)
        memory = get_profile(hardware).gpu_memory_bytes / 2**30
        metrics[f"{hardware}_gpu_memory_gib"] = memory
        own = [r for r in rows if r[0] == hardware and r[1] == "ilp" and r[2] <= memory]
        if own:
            best = max(own, key=lambda r: r[2])
            metrics[f"{hardware}_budget_gib"] = best[2]
            metrics[f"{hardware}_tokens_per_s_powerinfer"] = best[9]
            metrics[f"{hardware}_tokens_per_s_layer_split"] = best[10]
            metrics[f"{hardware}_speedup_over_layer_split"] = best[14]
    notes = (
        f"Profile: {first['profile']}. Budget = the GPU's memory; PowerInfer puts attention, predictors "
        f"({first.get('predictor_source', '')}), KV cache and, when room, the head there first, then the hot "
        "neurons the placement picks; `min_neurons` is its communication constraint on this machine. Tokens/s are "
        "cost-model projections (sparse_lm.roofline, see cost_model_validation for how far to trust them), "
        "not measurements; all_fast counts only where the model fits (`all_fast_fits`). The per-machine metrics are "
        "at the largest budget its own GPU holds; larger budgets are what-ifs."
    )
    table = {"title": "Placement and projected decode per budget", "columns": list(COLUMNS), "rows": rows}
    return write_result(record_as, metrics, command=command, title=f"Neuron placement sweep: {first['model_shape']}",
                        notes=notes, tables=[table], results_dir=results_dir)
