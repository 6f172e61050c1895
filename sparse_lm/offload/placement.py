"""Neuron placement over a fast tier (GPU memory) and a slow one (host memory): PowerInfer's integer program,
solved with HiGHS, and the greedy top-k baseline, both over the same neuron groups.
Legend: L layers, F neurons per layer, G groups per layer.

The program (PowerInfer, section 6): a binary per group of neurons says "on the fast tier"; maximise the summed
firing frequency of the fast neurons, subject to the fast tier's capacity; each neuron is on exactly one tier (the
binary and its complement); and per layer, either no neurons on the fast tier or at least C of them (a binary y_l
with a big-K bound). PowerInfer's per-layer communication constraint, C_l T_fast + T_sync <= C_l T_slow with T the
time to compute one neuron on a tier, says the same thing: splitting a layer over both tiers pays only when the
fast tier saves more than one synchronisation, i.e. C_l >= T_sync / (T_slow - T_fast); `min_fast_neurons` turns
hardware numbers into that C.

Neurons are grouped within a layer in descending order of frequency (group g of a layer holds its ranks
[g * size, (g + 1) * size)), so a group's value is the sum of its members' frequencies and any fast set the
program picks is a per-layer prefix of the hottest neurons. Greedy takes groups in descending value while they
fit, then drops layers left with fewer than C fast neurons, one at a time, refilling the freed capacity. Both
search the same grouped space, so the program's optimum is never below greedy.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from jaxtyping import Bool, Float, Int


class PlacementInfeasible(ValueError):
    """A placement problem with no feasible solution (the message names the budget or bound at fault)."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """A placement: `mask[l, i]` is True for neuron i of layer l on the fast tier.

    Attributes:
      mask: bool [L, F].
      objective: summed firing frequency of the fast neurons.
      solve_seconds: wall time of the solve (grouping included).
      solver: "ilp" or "greedy".
      status: the solver's final status ("optimal", "time limit", ...); greedy is always "heuristic".
      mip_gap: relative gap between the incumbent and the best bound (0 for a proven optimum; nan for greedy).
    """

    mask: Bool[np.ndarray, "L F"]
    objective: float
    solve_seconds: float
    solver: str
    status: str
    mip_gap: float = math.nan

    @property
    def fast_neurons(self) -> Int[np.ndarray, " L"]:
        return self.mask.sum(axis=1)

    def fast_firing_share(self, frequencies: Float[np.ndarray, "L F"]) -> Float[np.ndarray, " L"]:
        """Per layer, the share of its firings made by its fast neurons (0 for a layer that never fires)."""
        frequencies = np.asarray(frequencies, np.float64)
        total = frequencies.sum(axis=1)
        fast = np.where(self.mask, frequencies, 0.0).sum(axis=1)
        return np.divide(fast, total, out=np.zeros_like(total), where=total > 0)


@dataclasses.dataclass(frozen=True)
class NeuronGroups:
    """Neurons of each layer in descending frequency, cut into groups of `size` (the last group of a layer may
    be smaller). `order[l]` lists layer l's neuron indices hottest first; `value[l, g]` and `count[l, g]` are the
    summed frequency and the number of neurons of group g."""

    order: Int[np.ndarray, "L F"]
    value: Float[np.ndarray, "L G"]
    count: Int[np.ndarray, "L G"]
    size: int

    def mask(self, groups_per_layer: Int[np.ndarray, " L"]) -> Bool[np.ndarray, "L F"]:
        """The placement that puts each layer's first `groups_per_layer[l]` groups on the fast tier."""
        layers, d_ff = self.order.shape
        neurons = np.minimum(np.asarray(groups_per_layer) * self.size, d_ff)
        mask = np.zeros((layers, d_ff), dtype=bool)
        for layer in range(layers):
            mask[layer, self.order[layer, : neurons[layer]]] = True
        return mask


def _check_frequencies(frequencies) -> np.ndarray:
    frequencies = np.asarray(frequencies, np.float64)
    if frequencies.ndim != 2 or 0 in frequencies.shape:
        raise ValueError(f"frequencies must be a non-empty [layers, d_ff] array, got shape {frequencies.shape}")
    if not np.all(np.isfinite(frequencies)) or frequencies.min() < 0:
        raise ValueError("frequencies must be finite and non-negative")
    return frequencies


def group_neurons(frequencies: Float[np.ndarray, "L F"], group_size: int) -> NeuronGroups:
    """Sorts each layer's neurons by descending frequency (ties: lower index first) and groups them."""
    frequencies = _check_frequencies(frequencies)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    layers, d_ff = frequencies.shape
    order = np.argsort(-frequencies, axis=1, kind="stable")
    ranked = np.take_along_axis(frequencies, order, axis=1)
    groups = -(-d_ff // group_size)
    padded = np.zeros((layers, groups * group_size))
    padded[:, :d_ff] = ranked
    value = padded.reshape(layers, groups, group_size).sum(axis=2)
    count = np.full((layers, groups), group_size, np.int64)
    count[:, -1] = d_ff - (groups - 1) * group_size
    return NeuronGroups(order, value, count, group_size)


def min_fast_neurons(
    neuron_bytes: float, fast_bandwidth: float, slow_bandwidth: float, sync_seconds: float
) -> int:
    """PowerInfer's communication constraint as a neuron count: the least C with C T_fast + T_sync <= C T_slow,
    where computing one neuron costs its bytes over the tier's bandwidth (decode is memory bound).

    Args:
      neuron_bytes: bytes read to compute one neuron (its rows in all FFN matrices).
      fast_bandwidth, slow_bandwidth: bytes/s of the fast and slow tiers.
      sync_seconds: one synchronisation of a layer's partial outputs across the tiers.
    """
    for name, value in (("neuron_bytes", neuron_bytes), ("fast_bandwidth", fast_bandwidth),
                        ("slow_bandwidth", slow_bandwidth)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if sync_seconds < 0:
        raise ValueError(f"sync_seconds must be >= 0, got {sync_seconds}")
    saving = neuron_bytes / slow_bandwidth - neuron_bytes / fast_bandwidth
    if saving <= 0:
        raise ValueError(
            f"the fast tier ({fast_bandwidth:.3g} B/s) must be faster than the slow one ({slow_bandwidth:.3g} B/s)"
        )
    return math.ceil(sync_seconds / saving - 1e-12)


def _check_problem(frequencies, capacity_neurons: int, min_neurons: int) -> np.ndarray:
    frequencies = _check_frequencies(frequencies)
    if isinstance(capacity_neurons, bool) or not isinstance(capacity_neurons, int | np.integer):
        raise ValueError(f"capacity (neurons on the fast tier) must be an integer, got {capacity_neurons!r}")
    if capacity_neurons < 0:
        raise PlacementInfeasible(
            f"the fast-tier budget holds {capacity_neurons} neurons: what is reserved on the fast tier exceeds "
            "the budget"
        )
    if isinstance(min_neurons, bool) or not isinstance(min_neurons, int | np.integer) or min_neurons < 0:
        raise ValueError(f"min_neurons must be a non-negative integer, got {min_neurons!r}")
    if min_neurons > frequencies.shape[1]:
        raise PlacementInfeasible(
            f"min_neurons {min_neurons} exceeds the {frequencies.shape[1]} neurons of a layer: no layer can be "
            "split over the tiers"
        )
    return frequencies


def greedy_placement(
    frequencies: Float[np.ndarray, "L F"], capacity_neurons: int, *, group_size: int = 64, min_neurons: int = 0
) -> Placement:
    """Greedy top-k over neuron groups (PowerInfer's released solver): the most valuable groups while they fit,
    then, while some layer is left with fewer than `min_neurons`, the least valuable such layer is dropped and
    the freed capacity refilled from the other layers."""
    start = time.perf_counter()
    frequencies = _check_problem(frequencies, capacity_neurons, min_neurons)
    groups = group_neurons(frequencies, group_size)
    layers, n_groups = groups.value.shape
    # Descending value; within a layer values descend with g, so taking groups in this order keeps prefixes.
    ranked = np.argsort(-groups.value.reshape(-1), kind="stable")
    taken = np.zeros(layers, np.int64)
    used = 0

    def fill(allowed: np.ndarray) -> int:
        nonlocal used
        for flat in ranked:
            layer, group = divmod(int(flat), n_groups)
            if not allowed[layer] or group != taken[layer]:
                continue
            size = int(groups.count[layer, group])
            if used + size <= capacity_neurons:
                taken[layer] += 1
                used += size
        return used

    allowed = np.ones(layers, dtype=bool)
    fill(allowed)
    while True:
        neurons = np.minimum(taken * group_size, frequencies.shape[1])
        short = np.flatnonzero((neurons > 0) & (neurons < min_neurons))
        if short.size == 0:
            break
        # Drop the least valuable short layer for good and refill the rest, short layers included: they may
        # reach the bound with the freed capacity.
        worst = short[np.argmin(_prefix_value(groups, taken)[short])]
        used -= int(neurons[worst])
        taken[worst] = 0
        allowed[worst] = False
        fill(allowed)
    mask = groups.mask(taken)
    return Placement(mask, float(frequencies[mask].sum()), time.perf_counter() - start, "greedy", "heuristic")


def _prefix_value(groups: NeuronGroups, taken: np.ndarray) -> np.ndarray:
    """Per layer, the summed value of its first `taken[l]` groups."""
    cumulative = np.concatenate([np.zeros((groups.value.shape[0], 1)), np.cumsum(groups.value, axis=1)], axis=1)
    return cumulative[np.arange(groups.value.shape[0]), taken]


def ilp_placement(
    frequencies: Float[np.ndarray, "L F"],
    capacity_neurons: int,
    *,
    group_size: int = 64,
    min_neurons: int = 0,
    time_limit: float = 60.0,
    mip_rel_gap: float = 0.0,
) -> Placement:
    """PowerInfer's placement program over neuron groups, solved by HiGHS (branch and bound).

    Variables: a[l, g] binary (group g of layer l on the fast tier), y[l] binary (layer l uses the fast tier).
    Maximise sum value[l, g] a[l, g] subject to sum count a <= capacity; per layer
    min_neurons y_l <= sum_g count a[l, g] <= F y_l; and a[l, g] <= a[l, g - 1] (the hottest groups first: it
    removes symmetric solutions, not optimal ones). Greedy's solution is passed as the starting incumbent.

    Args:
      frequencies: firing frequency (or count) per neuron [L, F].
      capacity_neurons: neurons the fast tier holds (budget bytes / bytes per neuron, after what is reserved).
      group_size: neurons per binary (PowerInfer groups 64).
      min_neurons: the per-layer "at least C or none" bound (see `min_fast_neurons`).
      time_limit: seconds before HiGHS returns its incumbent (status "time limit").
      mip_rel_gap: relative optimality gap at which HiGHS stops (0: prove optimality).
    """
    import highspy

    start = time.perf_counter()
    frequencies = _check_problem(frequencies, capacity_neurons, min_neurons)
    groups = group_neurons(frequencies, group_size)
    layers, n_groups = groups.value.shape
    d_ff = frequencies.shape[1]
    n_a = layers * n_groups
    a_col = np.arange(n_a).reshape(layers, n_groups)
    y_col = n_a + np.arange(layers)
    counts = groups.count.astype(np.float64)

    rows_index, rows_value, lower, upper = [], [], [], []

    def add_row(index, value, low, high):
        rows_index.append(np.asarray(index, np.int32))
        rows_value.append(np.asarray(value, np.float64))
        lower.append(low)
        upper.append(high)

    add_row(a_col.reshape(-1), counts.reshape(-1), -highspy.kHighsInf, float(capacity_neurons))
    for layer in range(layers):
        index = np.append(a_col[layer], y_col[layer])
        add_row(index, np.append(counts[layer], -float(min_neurons)), 0.0, highspy.kHighsInf)
        add_row(index, np.append(counts[layer], -float(d_ff)), -highspy.kHighsInf, 0.0)
        for group in range(1, n_groups):
            add_row([a_col[layer, group], a_col[layer, group - 1]], [1.0, -1.0], -highspy.kHighsInf, 0.0)

    lp = highspy.HighsLp()
    lp.num_col_ = n_a + layers
    lp.num_row_ = len(lower)
    lp.col_cost_ = np.concatenate([groups.value.reshape(-1), np.zeros(layers)])
    lp.col_lower_ = np.zeros(lp.num_col_)
    lp.col_upper_ = np.ones(lp.num_col_)
    lp.row_lower_ = np.asarray(lower)
    lp.row_upper_ = np.asarray(upper)
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.integrality_ = [highspy.HighsVarType.kInteger] * lp.num_col_
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum([len(i) for i in rows_index])]).astype(np.int32)
    lp.a_matrix_.index_ = np.concatenate(rows_index)
    lp.a_matrix_.value_ = np.concatenate(rows_value)

    solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    solver.setOptionValue("time_limit", float(time_limit))
    solver.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    solver.setOptionValue("threads", 1)
    solver.passModel(lp)
    warm = greedy_placement(frequencies, capacity_neurons, group_size=group_size, min_neurons=min_neurons)
    start_values = _as_columns(warm.mask, groups, a_col, y_col, lp.num_col_)
    solution = highspy.HighsSolution()
    solution.col_value = list(start_values)
    solver.setSolution(solution)
    solver.run()
    status = solver.getModelStatus()
    values = np.asarray(solver.getSolution().col_value)
    if status == highspy.HighsModelStatus.kInfeasible or values.size != lp.num_col_:
        raise PlacementInfeasible(f"HiGHS found no feasible placement ({solver.modelStatusToString(status)})")
    taken = np.round(values[:n_a]).astype(np.int64).reshape(layers, n_groups).sum(axis=1)
    mask = groups.mask(taken)
    info = solver.getInfo()
    return Placement(
        mask,
        float(frequencies[mask].sum()),
        time.perf_counter() - start,
        "ilp",
        solver.modelStatusToString(status).lower(),
        float(info.mip_gap),
    )


def _as_columns(mask, groups: NeuronGroups, a_col, y_col, n_cols: int) -> np.ndarray:
    """A prefix placement as the program's column values (groups fully on the fast tier, layers in use)."""
    values = np.zeros(n_cols)
    fast = mask.sum(axis=1)
    for layer, neurons in enumerate(fast):
        full = int(np.searchsorted(np.cumsum(groups.count[layer]), neurons, side="right"))
        values[a_col[layer, :full]] = 1.0
        values[y_col[layer]] = float(neurons > 0)
    return values


def place(
    frequencies: Float[np.ndarray, "L F"], capacity_neurons: int, *, solver: str = "ilp", **options
) -> Placement:
    """Dispatches to `ilp_placement` or `greedy_placement` by name."""
    solvers = {"ilp": ilp_placement, "greedy": greedy_placement}
    if solver not in solvers:
        raise ValueError(f"solver must be one of {sorted(solvers)}, got {solver!r}")
    if solver == "greedy":
        options = {k: v for k, v in options.items() if k in ("group_size", "min_neurons")}
    return solvers[solver](frequencies, capacity_neurons, **options)
