"""Where a training step's time goes, for any training preset:
`python experiments/profile_train_step.py experiment=relufy_smollm2_fatrelu` (record train_step_<name>)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.train.step_profile import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile_train_step")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(f"{s['name']}: {s['tokens_per_s']:.0f} tokens/s, MFU {s['mfu']:.1%} of {s['matmul_peak_gflops']:.0f} "
          "GFLOP/s")
    for p in s["parts"]:
        print(f"  {p['part']:>16}: {p['ms']:8.0f} ms ({p['share_of_step']:.0%} of the step), "
              f"{p['gflop_per_s']:.0f} GFLOP/s ({p['of_matmul_peak']:.0%} of peak)")


if __name__ == "__main__":
    main()
