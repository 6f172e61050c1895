"""Neuron placement over a fast and a slow tier: `python experiments/place.py model_shape=llama7b solver=ilp|greedy
budget=25%` (a share of the FFN weights, or a size such as 8GiB)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.offload.run import run

register()
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it logs every file it writes at INFO


@hydra.main(version_base="1.3", config_path="../conf", config_name="place")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(f"{s['model_shape']} {s['solver']} ({s['status']}): objective {s['objective']:.1f} "
          f"(greedy {s['objective_greedy']:.1f}) in {s['solve_seconds']:.2f} s; {s['fast_neurons']} fast neurons "
          f"({s['fast_fraction']:.1%}) make {s['fast_firing_share']:.1%} of firings; profile: {s['profile']}")


if __name__ == "__main__":
    main()
