"""Perplexity versus training-free FFN sparsity: `python experiments/teal.py record_as=teal_smollm2`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.profiling.teal import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="teal")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    for target, achieved, ppl, increase in zip(
        s["targets"], s["achieved_sparsity"], s["perplexity"], s["perplexity_increase_percent"], strict=True
    ):
        print(f"target {target:.0%}: achieved {achieved:.1%}, perplexity {ppl:.3f} ({increase:+.2f}%)")


if __name__ == "__main__":
    main()
