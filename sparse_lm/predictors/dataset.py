"""Predictor training data: per layer, (FFN input, firing mask) pairs streamed to disk in shards.

A dataset folder holds `manifest.json` and one folder per shard, `shard_00000/`, written under a temporary
name and renamed when complete (a killed collection resumes after the last complete shard). A shard holds,
per layer l, `x_l.npy` (float16 [T, D]), `fired_l.npy` (packed bits [T, F/8]) and, when asked,
`abs_l.npy` (float16 |a| [T, F], for the missed-mass metric). Files are read memory-mapped, one layer of one
shard at a time, so memory stays bounded whatever the dataset's size.
Legend: B batch, S sequence length, T tokens, D d_model, F d_ff.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Int
from tqdm.auto import tqdm

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.firing import FiringConfig, fire_mask
from sparse_lm.utils.io import atomic_write_json

MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """A predictor dataset folder is missing, empty or belongs to another configuration."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    fingerprint: str  # identifies model, corpus split, rule and thresholds
    n_layers: int
    d_model: int
    d_ff: int
    shards: int  # planned shards
    tokens_per_shard: int
    with_abs: bool


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def complete_shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("shard_*") if p.is_dir() and not p.name.endswith(".tmp"))


def collect(
    model: Transformer,
    sequences: Int[np.ndarray, "N S"],
    firing: FiringConfig,
    thresholds: np.ndarray,
    folder: str | Path,
    *,
    batch_size: int,
    batches_per_shard: int,
    with_abs: bool,
    fingerprint: str,
    progress: bool = True,
) -> Manifest:
    """Writes the shards of `sequences` (whole batches; a last partial batch is dropped) under `folder`.

    Resumes after the complete shards already there; refuses a folder of another `fingerprint`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    n_batches = len(sequences) // batch_size
    if n_batches == 0:
        raise DatasetError(f"{len(sequences)} sequences make no batch of {batch_size}")
    n_shards = -(-n_batches // batches_per_shard)
    manifest = Manifest(fingerprint, config.n_layers, config.d_model, config.d_ff, n_shards,
                        batches_per_shard * batch_size * sequences.shape[1], with_abs)
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        saved = Manifest(**json.loads(manifest_path.read_text()))
        if saved != manifest:
            raise DatasetError(f"{folder} holds another predictor dataset ({saved}); use a new folder")
    atomic_write_json(manifest_path, dataclasses.asdict(manifest))
    for stale in folder.glob("shard_*.tmp"):
        shutil.rmtree(stale)  # a shard cut by a kill
    done = len(complete_shards(folder))
    points = {CapturePoint.ffn_input, CapturePoint.ffn_hidden} | set(firing.rule.capture_points)
    set_capture(model, points)
    graphdef, params = nnx.split(model)
    set_capture(model, ())
    k = firing.topk(config.d_ff)

    @jax.jit
    def features(params, tokens, thresholds):
        _, captured = capture_forward(nnx.merge(graphdef, params), tokens)
        xs, fired, absolute = [], [], []
        for layer, hidden in enumerate(captured[CapturePoint.ffn_hidden]):
            gate = captured[CapturePoint.ffn_gate][layer] if CapturePoint.ffn_gate in captured else None
            mask = fire_mask(firing.rule, hidden, gate=gate, threshold=thresholds[layer], k=k)
            xs.append(captured[CapturePoint.ffn_input][layer].reshape(-1, config.d_model).astype(jnp.float16))
            fired.append(mask.reshape(-1, config.d_ff))
            absolute.append(jnp.abs(hidden).reshape(-1, config.d_ff).astype(jnp.float16))
        return jnp.stack(xs), jnp.stack(fired), jnp.stack(absolute) if with_abs else None

    device_thresholds = jnp.asarray(thresholds, jnp.float32)
    bar = tqdm(total=n_shards, initial=done, desc="predictor data", unit="shard", disable=not progress)
    for shard in range(done, n_shards):
        chunks: list[tuple] = []
        for batch in range(shard * batches_per_shard, min((shard + 1) * batches_per_shard, n_batches)):
            tokens = sequences[batch * batch_size : (batch + 1) * batch_size]
            chunks.append(jax.device_get(features(params, tokens, device_thresholds)))
        tmp = folder / f"{_shard_name(shard)}.tmp"
        tmp.mkdir(exist_ok=True)
        for layer in range(config.n_layers):
            np.save(tmp / f"x_{layer}.npy", np.concatenate([c[0][layer] for c in chunks]))
            np.save(tmp / f"fired_{layer}.npy", np.packbits(np.concatenate([c[1][layer] for c in chunks]), axis=1))
            if with_abs:
                np.save(tmp / f"abs_{layer}.npy", np.concatenate([c[2][layer] for c in chunks]))
        tmp.rename(folder / _shard_name(shard))
        bar.update(1)
    bar.close()
    return manifest


def open_dataset(folder: str | Path) -> tuple[Manifest, list[Path]]:
    """The manifest and the complete shards of a dataset folder (errors name the folder)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise DatasetError(f"{folder} is not a predictor dataset (no {MANIFEST})")
    manifest = Manifest(**json.loads(path.read_text()))
    shards = complete_shards(folder)
    if not shards:
        raise DatasetError(f"{folder} has no complete shard")
    return manifest, shards


@dataclasses.dataclass(frozen=True)
class ShardHalf:
    """The first (half=0) or second (half=1) half of one shard's tokens: disjoint token sets from one shard."""

    path: Path
    half: int

    def __truediv__(self, name: str) -> Path:  # reads like a shard folder: `shard / "x_0.npy"`
        return self.path / name

    def rows(self, n_tokens: int) -> slice:
        middle = n_tokens // 2
        return slice(0, middle) if self.half == 0 else slice(middle, n_tokens)


Shard = Path | ShardHalf


def calibration_split(shards: list[Path]) -> tuple[list[Shard], list[Shard]]:
    """Disjoint (calibration, measurement) tokens from the validation shards: alternate shards, or with a single
    shard its two halves. Thresholds fitted on one set are always measured on the other."""
    if not shards:
        raise DatasetError("no validation shard to calibrate and measure on")
    if len(shards) > 1:
        return shards[::2], shards[1::2]
    return [ShardHalf(shards[0], 0)], [ShardHalf(shards[0], 1)]


def _shard_rows(shard: Shard, n_tokens: int) -> np.ndarray:
    if isinstance(shard, ShardHalf):
        return np.arange(n_tokens)[shard.rows(n_tokens)]
    return np.arange(n_tokens)


@dataclasses.dataclass(frozen=True)
class LayerBatch:
    x: np.ndarray  # float32 [T, D]
    fired: np.ndarray  # bool [T, F]
    abs_hidden: np.ndarray | None  # float32 [T, F]


def layer_batches(
    shards: list[Shard], layer: int, d_ff: int, batch_tokens: int, *, shuffle_seed: int | None = None,
    with_abs: bool = False,
) -> Iterator[LayerBatch]:
    """One layer's tokens in batches, shard by shard (shuffled within each shard when a seed is given)."""
    for index, shard in enumerate(shards):
        x = np.load(shard / f"x_{layer}.npy", mmap_mode="r")
        fired = np.load(shard / f"fired_{layer}.npy", mmap_mode="r")
        absolute = np.load(shard / f"abs_{layer}.npy", mmap_mode="r") if with_abs else None
        order = _shard_rows(shard, len(x))
        if shuffle_seed is not None:
            order = np.random.default_rng([shuffle_seed, layer, index]).permutation(order)
        for first in range(0, len(x), batch_tokens):
            rows = np.sort(order[first : first + batch_tokens])
            yield LayerBatch(
                np.asarray(x[rows], np.float32),
                np.unpackbits(np.asarray(fired[rows]), axis=1, count=d_ff).astype(bool),
                None if absolute is None else np.asarray(absolute[rows], np.float32),
            )


def firing_counts(shards: list[Path], n_layers: int, d_ff: int) -> tuple[np.ndarray, int]:
    """Per layer and neuron, how many tokens of `shards` fire it ([L, F]), and the token count: the profile of
    the training pairs, for profile-guided sizing."""
    counts = np.zeros((n_layers, d_ff), np.int64)
    tokens = 0
    for shard in shards:
        for layer in range(n_layers):
            bits = np.load(shard / f"fired_{layer}.npy", mmap_mode="r")
            counts[layer] += np.unpackbits(np.asarray(bits), axis=1, count=d_ff).sum(axis=0, dtype=np.int64)
        tokens += bits.shape[0]
    return counts, tokens
