"""What limits activation predictors:
`python experiments/predictor_scaling.py experiment=predictor_scaling_smollm2_drelu`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.predictors.scaling import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="predictor_scaling")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    last = max(r["epoch"] for r in s["trained"])
    for r in s["trained"]:
        if r["epoch"] == last:
            print(f"layer {r['layer']} pairs {r['train_pairs']} rank {r['rank']}: predicted/true "
                  f"{r['val_predicted_over_true']:.2f} (train {r['train_predicted_over_true']:.2f})")
    for r in s["projection"]:
        print(f"layer {r['layer']} projection rank {r['rank']}: predicted/true {r['predicted_over_true']:.2f}")


if __name__ == "__main__":
    main()
