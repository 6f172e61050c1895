"""End-to-end decode of a model with its activation predictors: dense against the sparse engine, measured side by
side in one run (interleaved repeats), with both perplexities on the same validation tokens.

Capacities come from the profile of predicted counts on training tokens (`sparse.capacity_quantile`). The floor
of the sparse step is the bytes it must read per token (every weight except the FFN rows not predicted, plus the
predictors) over the read bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.cpu import collapse_to_huge_pages
from sparse_lm.data import DataConfig, Split, pack_sequences, split_tokens
from sparse_lm.eval.generate import Generator, prompt_bucket
from sparse_lm.eval.perplexity import perplexity
from sparse_lm.predictors import load_predictors
from sparse_lm.predictors.quantized import Int4PredictorSet, calibrate, row_reads
from sparse_lm.sparse import SparseEngineConfig, choose_capacities, install, predicted_counts, remove

ROW_READ_TOKENS = 2048  # validation tokens over which the int4 engine's row reads (its floor) are counted


class SkipFFN(nnx.Module):
    """An FFN executor returning zeros: the decode step without any FFN, the ceiling of every sparse FFN."""

    def __call__(self, ffn, x):
        return jnp.zeros_like(x)


def compare(model, tokenizer, prompt: list[int], *, predictors_dir: str, int4_recall: float | None,
            sparse: SparseEngineConfig, data: DataConfig, new_tokens: int, repeats: int, calibration_tokens: int,
            perplexity_tokens: int, context: int, dense_weight_bytes: int, bandwidth: float, progress: bool,
            peer=None, original=None) -> dict[str, Any]:
    """Dense and sparse tokens/s (median of interleaved repeats) and perplexities; model is left dense.
    `original`: the model before its ReLU-fication, whose perplexity on the same tokens is reported beside.

    The predictors are the trained ones in `predictors_dir`, or with `int4_recall` int4 predictors built from the
    model and calibrated to that recall on the calibration tokens."""
    config = model.config
    train = split_tokens(data.with_split(Split.train), tokenizer, progress=progress)
    rows = pack_sequences(train[:calibration_tokens], 256).tokens
    if int4_recall is None:
        folder = Path(predictors_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"predictors={predictors_dir}: no such folder (a train_predictor run's "
                                    "predictors/)")
        predictors = load_predictors(folder, config)
    else:
        predictors = Int4PredictorSet(model)
        calibrate(model, predictors, rows, int4_recall, progress=progress)
    counts = predicted_counts(model, predictors, rows)
    capacities = choose_capacities(counts, config.d_ff, sparse.capacity_quantile, sparse.capacity_multiple)
    capacity = prompt_bucket(len(prompt)) + new_tokens
    dense = Generator(model, capacity=capacity)
    install(model, predictors, capacities, sparse.implementation)
    huge = collapse_to_huge_pages(*jax.tree.leaves(nnx.state(model))) if sparse.huge_pages else 0
    engine = Generator(model, capacity=capacity)
    for block in model.blocks:
        block.ffn.executor = SkipFFN()
    ffn_free = Generator(model, capacity=capacity)
    remove(model)
    dense_runs, sparse_runs, ffn_free_runs, peer_runs = [], [], [], []
    for _ in range(repeats):  # interleaved: all see the same machine state
        dense_runs.append(dense.generate(prompt, new_tokens))
        sparse_runs.append(engine.generate(prompt, new_tokens))
        ffn_free_runs.append(ffn_free.generate(prompt, new_tokens))
        if peer is not None:
            peer_runs.append(peer.run()[0])
    validation = split_tokens(data.with_split(Split.validation), tokenizer, progress=progress)[:perplexity_tokens]
    perplexity_dense = perplexity(model, validation, context=context, progress=progress).perplexity
    install(model, predictors, capacities, sparse.implementation)
    try:
        perplexity_sparse = perplexity(model, validation, context=context, progress=progress).perplexity
    finally:
        remove(model)
    original_summary = {}
    if original is not None:
        perplexity_original = perplexity(original, validation, context=context, progress=progress).perplexity
        original_summary = {"perplexity_original": perplexity_original,
                            "perplexity_sparse_over_original": perplexity_sparse / perplexity_original - 1,
                            "original_activation": original.config.activation.value}
    mean_predicted = counts.mean(axis=1)
    row_bytes = config.d_model * 4
    ffn_row_bytes = (3 if config.activation.gated else 2) * row_bytes
    int4_summary = {}
    if int4_recall is None:  # the C++ call reads the gate, up and down rows of every predicted neuron
        sparse_ffn_bytes = int(mean_predicted.sum()) * ffn_row_bytes
    else:  # the gate row of every predicted neuron, the up row behind a passing gate, the down row where a != 0
        reads = row_reads(model, predictors, pack_sequences(validation[:ROW_READ_TOKENS], 256).tokens, capacities)
        gated = config.activation.gated
        sparse_ffn_bytes = int(row_bytes * ((reads["predicted"].sum() if gated else 0) + reads["gate_passed"].sum()
                                            + reads["fired_predicted"].sum()))
        int4_summary = {
            "int4_target_recall": int4_recall,
            "recall_validation_mean": float(reads["recall"].mean()),
            "true_active_mean": float(reads["fired"].mean() / config.d_ff),
            "gate_passed_mean": float(reads["gate_passed"].mean() / config.d_ff),
            "fired_predicted_mean": float(reads["fired_predicted"].mean() / config.d_ff),
            "recall_validation_per_layer": [float(r) for r in reads["recall"]],
        }
    sparse_bytes = (dense_weight_bytes - config.n_layers * config.d_ff * ffn_row_bytes + sparse_ffn_bytes
                    + predictors.nbytes())
    dense_tps = statistics.median(r.decode_tokens_per_s for r in dense_runs)
    sparse_tps = statistics.median(r.decode_tokens_per_s for r in sparse_runs)
    ffn_free_tps = statistics.median(r.decode_tokens_per_s for r in ffn_free_runs)
    same = sum(a == b for a, b in zip(dense_runs[0].tokens, sparse_runs[0].tokens, strict=True))
    peer_summary = {}
    if peer_runs:
        peer_summary = {"tokens_per_s_llama_cpp_interleaved": statistics.median(peer_runs),
                        "sparse_over_llama_cpp": sparse_tps / statistics.median(peer_runs)}
    return peer_summary | int4_summary | original_summary | {
        "predictor_kind": "trained" if int4_recall is None else "int4",
        "predictor_bytes": predictors.nbytes(),
        "huge_page_bytes": huge,
        "tokens_per_s_dense": dense_tps,
        "tokens_per_s_sparse": sparse_tps,
        "sparse_speedup": sparse_tps / dense_tps,
        # the same step with every FFN skipped: no sparse FFN, however fast, can beat this
        "tokens_per_s_ffn_free": ffn_free_tps,
        "ffn_free_speedup": ffn_free_tps / dense_tps,
        "tokens_per_s_dense_runs": ", ".join(f"{r.decode_tokens_per_s:.2f}" for r in dense_runs),
        "tokens_per_s_sparse_runs": ", ".join(f"{r.decode_tokens_per_s:.2f}" for r in sparse_runs),
        "perplexity_dense": perplexity_dense,
        "perplexity_sparse": perplexity_sparse,
        "perplexity_change": perplexity_sparse / perplexity_dense - 1,
        "perplexity_tokens": len(validation),
        "predicted_active_mean": float(mean_predicted.mean() / config.d_ff),
        "capacities": capacities,
        "capacity_mean_fraction": float(np.mean(capacities) / config.d_ff),
        "sparse_bytes_per_token": sparse_bytes,
        "sparse_floor_tokens_per_s": bandwidth / sparse_bytes,
        "dense_floor_tokens_per_s": bandwidth / dense_weight_bytes,
        "greedy_tokens_equal_dense": same,
        "implementation": sparse.implementation.value,
    }
