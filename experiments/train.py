"""Training: `python experiments/train.py experiment=relufy_smollm2_drelu` (re-run to resume), or the sweep
`python experiments/train.py --multirun experiment=scratch_ffn_sweep`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.train.run import TrainingDivergedError, run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        s = run_entry(cfg, run)
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    line = (f"{s['name']} ({s['activation']}, {s['params'] / 1e6:.1f}M params, {s['tokens']:,} tokens): "
            f"val perplexity {s['val_perplexity']:.2f}, sparsity {s['sparsity']:.3f}")
    if "perplexity_top90" in s:
        line += f", perplexity at 90% top-k {s['perplexity_top90']:.2f}"
    print(line)


if __name__ == "__main__":
    main()
