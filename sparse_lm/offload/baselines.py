"""Offload baselines in the hybrid engine's framework: llama.cpp's layer split and FlexGen's weight streaming.
Legend: B batch, L length, D d_model, F d_ff.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
from jaxtyping import Array, Float

from sparse_lm.models.ffn import ffn_hidden
from sparse_lm.offload.memory_tiers import PINNED_HOST, host_dense_ffn, set_memory_kind, to_device, to_host

# The third baseline, every weight on the fast tier, is the model itself: dense, or with the sparse engine
# (sparse.install). All structures keep attention and its KV cache in device memory, as the hybrid engine does, so
# they differ only in where each FFN's weights live and where it runs. Both baselines here compute models.ffn's dense
# FFN (activation pair and threshold), so they reproduce the dense model.


@dataclasses.dataclass(frozen=True)
class LayerSplitConfig:
    """fast_layers: how many leading layers keep their FFN in device memory (llama.cpp's -ngl, counted in FFNs)."""

    fast_layers: int

    def __post_init__(self):
        if isinstance(self.fast_layers, bool) or not isinstance(self.fast_layers, int) or self.fast_layers < 0:
            raise ValueError(f"layer_split.fast_layers must be an int >= 0, got {self.fast_layers!r}")


class HostDenseExecutor(nnx.Module):
    """A slow layer of the split: its dense FFN computed on the host from its pinned_host weights."""

    def __call__(self, ffn, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        weights = (None if ffn.w_gate is None else ffn.w_gate[...], ffn.w_up[...], ffn.w_down[...])
        return to_device(host_dense_ffn(to_host(x), *weights, activation=ffn.activation, threshold=ffn.threshold,
                                        threshold_on=ffn.threshold_on))


class StreamedExecutor(nnx.Module):
    """FlexGen: the dense FFN on the device from weights kept in pinned_host memory and copied in at every call:
    inside the jitted step, one copy per matrix per layer per token (XLA, not Python, schedules the copies)."""

    def __call__(self, ffn, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        w_gate, w_up, w_down = to_device((None if ffn.w_gate is None else ffn.w_gate[...], ffn.w_up[...],
                                          ffn.w_down[...]))
        return ffn_hidden(x, w_gate, w_up, ffn.activation, ffn.threshold, ffn.threshold_on) @ w_down


def _check_dense(model) -> None:
    for layer, block in enumerate(model.blocks):
        ffn = block.ffn
        if ffn.executor is not None or ffn.predictor is not None or ffn.keep_top is not None:
            raise ValueError(f"the offload baselines mirror the dense FFN, but layer {layer}'s FFN has an executor, "
                             "predictor or keep_top set (remove_offload / predictors.attach(model, None) first)")


def _offload(ffn, executor: nnx.Module) -> None:
    for weight in (ffn.w_gate, ffn.w_up, ffn.w_down):
        set_memory_kind(weight, PINNED_HOST)
    ffn.executor = executor


def install_layer_split(model, config: LayerSplitConfig) -> None:
    """The first `fast_layers` FFNs stay dense in device memory; every later FFN's weights go to pinned_host and it
    runs densely on the host (memory_tiers.remove_offload undoes it)."""
    if config.fast_layers > model.config.n_layers:
        raise ValueError(f"layer_split.fast_layers = {config.fast_layers} exceeds the model's "
                         f"{model.config.n_layers} layers")
    _check_dense(model)
    for block in list(model.blocks)[config.fast_layers :]:
        _offload(block.ffn, HostDenseExecutor())


def install_flexgen(model) -> None:
    """Every FFN's weights go to pinned_host and stream to the device for each use (remove_offload undoes it)."""
    _check_dense(model)
    for block in model.blocks:
        _offload(block.ffn, StreamedExecutor())
