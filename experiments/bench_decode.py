"""Dense decode benchmark: `python experiments/bench_decode.py record_as=decode_benchmark`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.bench.decode import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_decode")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    print(
        f"{s['model']} decode: {s['sparse_lm_tokens_per_s']:.1f} tok/s (runs {s['sparse_lm_tokens_per_s_runs']}); "
        f"floor {s['bandwidth_floor_tokens_per_s']:.1f} tok/s = {s['read_bandwidth_gb_per_s']:.1f} GB/s / "
        f"{s['weight_bytes_per_token'] / 1e6:.0f} MB; {100 * s['fraction_of_floor']:.0f}% of floor; "
        f"matrix-vector products alone {s['matvec_only_tokens_per_s']:.1f} tok/s "
        f"({s['matvec_only_gb_per_s']:.1f} GB/s), "
        f"the rest {s['non_matvec_ms_per_token']:.1f} ms/token; "
        f"llama.cpp F32 (ANCHORS.md) {s['llama_cpp_f32_paper_tokens_per_s']:.1f} tok/s"
    )
    if "llama_cpp_tokens_per_s" in s:
        print(f"llama.cpp F32 in this run: {s['llama_cpp_tokens_per_s']:.1f} tok/s "
              f"(runs {s['llama_cpp_tokens_per_s_runs']})")
    if "tokens_per_s_sparse" in s:
        print(
            f"sparse engine ({s['implementation']}): {s['tokens_per_s_sparse']:.1f} tok/s vs dense "
            f"{s['tokens_per_s_dense']:.1f} in the same run ({s['sparse_speedup']:.2f}x; floors "
            f"{s['sparse_floor_tokens_per_s']:.1f} / {s['dense_floor_tokens_per_s']:.1f}); predicted "
            f"{s['predicted_active_mean']:.1%} of neurons; perplexity {s['perplexity_dense']:.2f} -> "
            f"{s['perplexity_sparse']:.2f} ({s['perplexity_change']:+.2%}); without any FFN "
            f"{s['tokens_per_s_ffn_free']:.1f} tok/s ({s['ffn_free_speedup']:.2f}x: the ceiling)"
        )


if __name__ == "__main__":
    main()
