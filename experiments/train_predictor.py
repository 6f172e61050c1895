"""Activation predictors: `python experiments/train_predictor.py model=... predictor=powerinfer ranks=[64]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.predictors.run import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_predictor")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(
        f"{s['model']} ({s['firing_rule']} rule): recall {s['recall_mean']:.3f}, precision {s['precision_mean']:.3f}, "
        f"predicted {s['predicted_active_mean']:.3f} vs true {s['true_active_mean']:.3f} active "
        f"({s['predicted_over_true']:.2f}x); perplexity {s['perplexity_dense']:.2f} -> {s['perplexity_predicted']:.2f} "
        f"({s['perplexity_change']:+.2%}); predictors {s['predictor_param_share']:.1%} of the model"
    )


if __name__ == "__main__":
    main()
