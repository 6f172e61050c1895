"""Builds the C++ twin of the sparse FFN kernels (kernels_pallas/cpu) against the XLA FFI headers that ship
with jaxlib (a build requirement in pyproject.toml); everything else is declared in pyproject.toml."""

import os

import jaxlib
from setuptools import Extension, setup

FFI_HEADERS = os.path.join(os.path.dirname(jaxlib.__file__), "include")

setup(
    ext_modules=[
        Extension(
            # a plain shared library loaded with ctypes and registered with jax.ffi, not a Python module
            "kernels_pallas.cpu._sparse_ffn_cpu",
            sources=["kernels_pallas/cpu/sparse_ffn_cpu.cc", "kernels_pallas/cpu/quant_predict_cpu.cc"],
            depends=["kernels_pallas/cpu/cpu_common.h"],
            language="c++",
            # -isystem: the FFI headers' own warnings are not ours; x86-64-v3 = AVX2 + FMA
            extra_compile_args=["-std=c++17", "-O3", "-march=x86-64-v3", "-isystem", FFI_HEADERS],
        ),
        Extension(
            # the disk tier (sparse_lm.offload.disk): io_uring reads, the neuron cache and its FFN, loaded with
            # ctypes and registered with jax.ffi; the same flags as above, so its FFN sums match the kernels' bit for bit
            "sparse_lm.offload._disk_tier",
            sources=["sparse_lm/offload/disk_tier.cc"],
            depends=["kernels_pallas/cpu/cpu_common.h"],
            include_dirs=["kernels_pallas/cpu"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-march=x86-64-v3", "-isystem", FFI_HEADERS],
        ),
    ]
)
