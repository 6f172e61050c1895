"""Calibrates this machine's hardware profile: `python experiments/calibrate_hardware.py` (under a minute)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.roofline.calibrate import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate_hardware")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(f"DRAM read {s['read_bandwidth_gb_per_s']:.1f} GB/s, f32 matmul {s['matmul_gflops']:.0f} GFLOP/s, "
          f"disk ({s['disk_filesystem']}) sequential {s['disk_sequential_mb_per_s']:.0f} MB/s, random 8 KiB "
          f"{s['disk_random_8k_iops']:.0f} IOPS ({s['disk_random_latency_us']:.0f} us each), host memory "
          f"{s['host_memory_gib']:.1f} GiB; {s['calibration_seconds']:.0f} s")


if __name__ == "__main__":
    main()
