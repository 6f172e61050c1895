"""llama.cpp as the peer in decode benchmarks: SmolLM2's GGUF rewritten with every tensor in F32 (the `gguf`
writer, dequantising with `gguf.quants`), decoded greedily through `llama-cpp-python` (the `bench` extra, which
builds llama.cpp from source) with the same thread count, in the same process as our own measurement.

llama.cpp has no dReLU FFN, so the peer of a ReLU-fied model is the original model of the same shapes: the
same bytes per token, hence the same decode speed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from sparse_lm.models.gguf_loader import smollm2_gguf_path

F32_FILE_TYPE = 0  # gguf's LlamaFileType.ALL_F32


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def write_f32_gguf(source: str | Path, target: str | Path) -> Path:
    """`source` with every tensor dequantised to F32 and all metadata copied, written atomically to `target`."""
    import gguf

    target = Path(target)
    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields["general.architecture"].contents()
    tmp = target.with_name(target.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # written by the writer itself, or changed below
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(F32_FILE_TYPE)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape(tuple(reversed([int(n) for n in tensor.shape]))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(target)
    return target


def f32_gguf(cache_dir: str | Path) -> Path:
    """The F32 rewrite of the shipped SmolLM2 GGUF, made once under `cache_dir`."""
    path = Path(cache_dir) / "SmolLM2-135M-Instruct.F32.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_f32_gguf(smollm2_gguf_path(), path)
    return path


class LlamaCppPeer:
    """A llama.cpp model held open, so its runs can be interleaved with ours."""

    def __init__(self, model_path: str | Path, prompt: str, new_tokens: int, threads: int | None = None):
        import llama_cpp

        self.threads = threads or len(os.sched_getaffinity(0))
        self.new_tokens = new_tokens
        self.llm = llama_cpp.Llama(str(model_path), n_ctx=max(256, 2 * new_tokens), n_threads=self.threads,
                                   n_threads_batch=self.threads, verbose=False)
        self.prompt = self.llm.tokenize(prompt.encode(), add_bos=False)
        self.run()  # warm-up

    def run(self) -> tuple[float, list[int]]:
        """Greedy decode: tokens after the first per second, and the generated ids."""
        self.llm.reset()
        generated, start = [], None
        for token in self.llm.generate(self.prompt, temp=0.0, reset=True):
            generated.append(int(token))
            if start is None:
                start = time.perf_counter()  # after the prompt and the first token
            if len(generated) == self.new_tokens:
                break
        return (len(generated) - 1) / (time.perf_counter() - start), generated

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode(errors="replace")

    def close(self) -> None:
        self.llm.close()
