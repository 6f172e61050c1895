"""The perplexity-sparsity frontier of SmolLM2: `python experiments/frontier.py record_as=frontier_smollm2`
(re-run to continue; `frontier.trained` adds trained runs as rows)."""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.eval.frontier import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="frontier")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    for row in s["rows"]:
        target = "trained" if math.isnan(row["target"]) else f"{row['target']:.0%}"
        print(f"{row['method']:>12} {target:>8}: sparsity web {row['sparsity_web']:.1%} pydocs "
              f"{row['sparsity_pydocs']:.1%}; perplexity web {row['perplexity_web']:.2f} "
              f"({row['increase_percent_web']:+.1f}%) pydocs {row['perplexity_pydocs']:.2f} "
              f"({row['increase_percent_pydocs']:+.1f}%)")


if __name__ == "__main__":
    main()
