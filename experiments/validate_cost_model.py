"""The cost model against PowerInfer's published speedups: `python experiments/validate_cost_model.py`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.common import run_entry
from experiments.schemas import register
from sparse_lm.roofline.validate import run

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="validate_cost_model")
def main(cfg: DictConfig) -> None:
    s = run_entry(cfg, run)
    if s["fitted_case"]:
        print(f"fitted {s['fitted_constant']} = {s['fitted_value']:.4g} on {s['fitted_case']}")
    for case, metric, _, _, precision, hardware, paper, projected, error, ok, fitted in s["case_rows"]:
        verdict = "fitted (not counted)" if fitted else f"{'within' if ok else 'outside'} {s['tolerance']:.0%}"
        print(f"{case:26s} {metric:14s} {precision} {hardware:8s} paper {paper:6.2f}  projected {projected:6.2f}  "
              f"error {error:+7.1%} {verdict}")
    counted = s["cases"] - (1 if s["fitted_case"] else 0)
    print(f"{s['speedup_cases_within_tolerance']} of {s['speedup_cases']} speedups and "
          f"{s['cases_within_tolerance']} of {counted} unfitted cases within {s['tolerance']:.0%}")


if __name__ == "__main__":
    main()
