"""Activation profile: `python experiments/profile.py model=smollm2_135m data=web firing=magnitude`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.profiling.run import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(
        f"{s['model']} ({s['firing_rule']} rule) on {' + '.join(s['corpora'])}: sparsity {s['sparsity_model']:.3f}, "
        f"80% of firings in {s['coverage80_model']:.1%} of neurons"
    )
    print(f"power-law fit: {s['powerlaw']['verdict']}")
    if "hot_overlap_mean" in s:
        print(f"top-20% hot-set overlap between domains: {s['hot_overlap_mean']:.3f}")
    if "profile_overhead" in s:
        print(f"profile step {s['profile_step_tokens_per_s']:.0f} tok/s vs plain forward "
              f"{s['plain_forward_tokens_per_s']:.0f} tok/s: overhead {s['profile_overhead']:+.1%}")


if __name__ == "__main__":
    main()
