"""Named model presets: the real SmolLM2-135M, tiny test models, and paper-size shapes (eval_shape only)."""

from __future__ import annotations

from sparse_lm.models.config import Activation, ModelConfig, NormKind, RopeLayout

SMOLLM2_135M = ModelConfig(
    name="smollm2_135m",
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    activation=Activation.swiglu,
    norm=NormKind.rmsnorm,
    norm_eps=1e-5,
    rope_base=100000.0,
    rope_layout=RopeLayout.interleaved,  # the GGUF converter permuted Q/K rows
    tie_embeddings=True,
    max_seq_len=8192,
    bos_token_id=1,
    eos_token_id=2,
)

TINY = ModelConfig(
    name="tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256
)

# From-scratch study (TurboSparse's dReLU-vs-SwiGLU comparison scaled to 2 CPU cores): 12.6M parameters with
# an 8192-id BPE trained on the corpus (the training run sets vocab_size to the tokenizer's).
SCRATCH_12M = ModelConfig(
    name="scratch_12m", vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024,
    activation=Activation.swiglu, rope_base=10000.0, tie_embeddings=True, max_seq_len=1024,
)

# Paper-size shapes. They are built only with jax.eval_shape (never materialised on this machine).
# PUBLISHED_PARAMS holds the counts their authors published; tests require ours within 1%.
LLAMA2_7B = ModelConfig(
    name="llama2_7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
    activation=Activation.swiglu, tie_embeddings=False, max_seq_len=4096,
)
MISTRAL_7B_DRELU = ModelConfig(
    name="mistral_7b_drelu", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    d_ff=14336, activation=Activation.drelu, rope_base=1e6, tie_embeddings=False, max_seq_len=32768,
)
OPT_6_7B = ModelConfig(
    name="opt_6_7b", vocab_size=50272, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=16384,
    activation=Activation.relu, norm=NormKind.layernorm, tie_embeddings=True, max_seq_len=2048,
)
# ReLU-fied Falcon-40B, as PowerInfer runs it (the original uses GELU): multi-query with 8 KV groups.
FALCON_40B = ModelConfig(
    name="falcon_40b", vocab_size=65024, d_model=8192, n_layers=60, n_heads=128, n_kv_heads=8, d_ff=32768,
    activation=Activation.relu, norm=NormKind.layernorm, tie_embeddings=False, max_seq_len=2048,
)

PUBLISHED_PARAMS = {
    "llama2_7b": 6.74e9,  # Llama 2 paper / model card: 6,738,415,616
    "mistral_7b_drelu": 7.24e9,  # Mistral-7B model card: 7,241,732,096 (dReLU keeps the three FFN matrices)
    "opt_6_7b": 6.66e9,  # OPT-6.7B checkpoint: 6,658,473,984 (learned positions and biases are the 0.15% we omit)
    "falcon_40b": 41.8e9,  # Falcon-40B checkpoint as listed on its model page (41.8B)
}

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SMOLLM2_135M, TINY, SCRATCH_12M, LLAMA2_7B, MISTRAL_7B_DRELU, OPT_6_7B, FALCON_40B)
}


def get_preset(name: str) -> ModelConfig:
    """Returns the preset called `name`; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
