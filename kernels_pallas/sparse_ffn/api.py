"""sparse_ffn: the FFN of the active neurons only (sparse gate/up, then sparse down), one token or a batch
sharing the union of their active sets with per-token masks.

Legend: B tokens, D d_model, F d_ff, K capacity of the active set.
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.common import Implementation
from kernels_pallas.sparse_down.api import sparse_down
from kernels_pallas.sparse_gate_up.api import sparse_gate_up
from sparse_lm.models.config import Activation


def sparse_ffn(
    x: Float[Array, "B D"] | Float[Array, " D"],
    indices: Int[Array, " K"],
    count: int | Int[Array, ""],
    w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"],
    w_down: Float[Array, "F D"],
    activation: Activation | str,
    *,
    token_mask: Bool[Array, "B K"] | None = None,
    gate_threshold: float | None = None,
    implementation: Implementation | str = Implementation.auto,
    interpret: bool | None = None,
) -> Float[Array, "B D"] | Float[Array, " D"]:
    """FFN output computing only neurons indices[:count] (each token only those its `token_mask` keeps, and with
    `gate_threshold` only those whose |sigma(gate)| exceeds it: see sparse_gate_up).

    All three matrices are stored [F, D]; reads K/F of the FFN's weight bytes.
    """
    hidden = sparse_gate_up(x, indices, count, w_gate, w_up, activation, token_mask=token_mask,
                            gate_threshold=gate_threshold, implementation=implementation, interpret=interpret)
    return sparse_down(hidden, indices, count, w_down, implementation=implementation, interpret=interpret)
