"""Perplexity and a sample generation: `python experiments/eval.py model=smollm2_135m data=web`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.eval.run import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = run_entry(cfg, run)
    print(f"{summary['model']} on {summary['corpus']}/{summary['split']} (context {summary['context']}): "
          f"nll {summary['nll']:.4f}, perplexity {summary['perplexity']:.3f} over {summary['scored_tokens']} tokens")
    if "sample" in summary:
        print(f"sample: {summary['prompt']}{summary['sample']}")
        print(f"prefill {summary['prefill_tokens_per_s']:.1f} tok/s, decode {summary['decode_tokens_per_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
