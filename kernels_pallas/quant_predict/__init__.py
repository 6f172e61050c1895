"""quant_predict: a 4-bit copy of the FFN's gate/up rows as an activation predictor, and the sparse FFN it drives."""

from kernels_pallas.quant_predict.api import int4_scores, quant_sparse_ffn
from kernels_pallas.quant_predict.reference import (
    GROUP,
    Int4Rows,
    capped_mask,
    decisive_projections,
    dequantize_rows,
    int4_scores_reference,
    quant_sparse_ffn_reference,
    quantize_rows,
    quantize_x,
)

__all__ = [
    "GROUP",
    "Int4Rows",
    "capped_mask",
    "decisive_projections",
    "dequantize_rows",
    "int4_scores",
    "int4_scores_reference",
    "quant_sparse_ffn",
    "quant_sparse_ffn_reference",
    "quantize_rows",
    "quantize_x",
]
