"""FFN-only benchmark, dense against sparse: `python experiments/bench_ffn.py shape=smollm2|llama7b`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.bench.ffn import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_ffn")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(f"{s['shape']} FFN (d {s['d_model']}, d_ff {s['d_ff']}): dense {s['dense_ms']:.3f} ms "
          f"({s['dense_gb_per_s']:.1f} GB/s; floor {s['dense_floor_ms']:.3f} ms at "
          f"{s['read_bandwidth_gb_per_s']:.1f} GB/s)")
    for row in s["rows"]:
        cells = ", ".join(f"{name} {value:.3g}" for name, value in zip(s["columns"][3:], row[3:], strict=True))
        print(f"  {row[0]:.0%} active ({row[1]} neurons): {cells}")


if __name__ == "__main__":
    main()
