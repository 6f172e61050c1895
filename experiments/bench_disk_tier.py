"""Disk tier benchmark (neuron cache vs naive whole-layer loading): `python experiments/bench_disk_tier.py`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.bench.disk_tier import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_disk_tier")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(
        f"{s['model']} ({s['model_path']}), RAM for {s['budget_fraction']:.0%} of the FFN weights: neuron cache "
        f"{s['tokens_per_s_cache']:.2f} tok/s vs naive {s['tokens_per_s_naive']:.2f} ({s['speedup']:.2f}x; target 5x "
        f"{'met' if s['speedup_target_met'] else 'missed'}); all in RAM {s['tokens_per_s_ram']:.2f} tok/s "
        f"({s['speedup_ceiling']:.2f}x naive: the ceiling); hit rate {s['hit_rate']:.2%}, "
        f"{s['bytes_per_token'] / 1e6:.2f} MB/token read ({s['reads_per_token']:.0f} reads) vs naive "
        f"{s['bytes_per_token_naive'] / 1e6:.1f} MB; disk {s['disk_sequential_gb_per_s']:.2f} GB/s sequential, "
        f"{s['disk_random_reads_per_s']:.0f} random {s['disk_read_bytes']} B reads/s at queue depth "
        f"{s['disk_queue_depth']}; tokens equal to the in-RAM engine: cache {s['tokens_equal_cache']}, naive "
        f"{s['tokens_equal_naive']} of {s['new_tokens']}"
    )
    for row in s["per_budget"]:
        print(f"  budget {row['budget_fraction']:.2f}: cache {row['tokens_per_s_cache']:.2f} naive "
              f"{row['tokens_per_s_naive']:.2f} ram {row['tokens_per_s_ram']:.2f} tok/s, "
              f"speedup {row['speedup']:.2f}x, "
              f"hit rate {row['hit_rate_cache']:.2%}, {row['bytes_per_token_cache'] / 1e6:.2f} vs "
              f"{row['bytes_per_token_naive'] / 1e6:.1f} MB/token")


if __name__ == "__main__":
    main()
