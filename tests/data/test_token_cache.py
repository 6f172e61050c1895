"""Token streams: exact ids with EOS separators, the on-disk cache, its keys, and recovery from a bad file."""

import io
from pathlib import Path

import numpy as np
import pytest
from fake_tokenizer import ByteTokenizer

from sparse_lm.data import (
    Corpus,
    DataConfig,
    Split,
    cache_path,
    load_documents,
    split_tokens,
    tokenize_documents,
)

WEB_SAMPLE = Path(__file__).parents[1] / "fixtures" / "web_sample.csv.gz"
EOS = ByteTokenizer.eos_token_id


@pytest.fixture
def text_cfg(tmp_path) -> DataConfig:
    path = tmp_path / "text.txt"
    path.write_text("héllo\n", encoding="utf-8")
    return DataConfig(
        corpus=Corpus.textfile, path=str(path), split=Split.all, cache_dir=str(tmp_path / "cache")
    )


def test_stream_is_documents_each_followed_by_eos(text_cfg):
    tokens = split_tokens(text_cfg, ByteTokenizer(), progress=False)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, [104, 0xC3, 0xA9, 108, 108, 111, 10, EOS])


def test_web_sample_stream(tmp_path):
    cfg = DataConfig(corpus=Corpus.web, path=str(WEB_SAMPLE), split=Split.all, cache_dir=str(tmp_path))
    tokens = split_tokens(cfg, ByteTokenizer(), progress=False)
    documents = load_documents(cfg)
    expected = [token for doc in documents for token in [*doc.text.encode(), EOS]]
    np.testing.assert_array_equal(tokens, expected)
    assert np.count_nonzero(tokens == EOS) == len(documents) == 7


def test_second_call_reads_the_cache(text_cfg, tmp_path):
    tokenizer = ByteTokenizer()
    first = split_tokens(text_cfg, tokenizer, progress=False)
    assert tokenizer.encoded_texts == 1
    path = cache_path(text_cfg, tokenizer)
    assert path.parent == tmp_path / "cache" / "tokens" and path.name.startswith("textfile-all-")
    np.testing.assert_array_equal(np.load(path), first)
    second = split_tokens(text_cfg, tokenizer, progress=False)
    assert tokenizer.encoded_texts == 1
    np.testing.assert_array_equal(second, first)


def test_cache_key_follows_tokenizer_split_and_source(text_cfg):
    tokenizer = ByteTokenizer()
    split_tokens(text_cfg, tokenizer, progress=False)
    other_vocab = ByteTokenizer(fingerprint="bytes-v2")
    split_tokens(text_cfg, other_vocab, progress=False)
    assert other_vocab.encoded_texts == 1
    assert cache_path(text_cfg, other_vocab) != cache_path(text_cfg, tokenizer)
    assert cache_path(text_cfg.replace(split_seed=1), tokenizer) != cache_path(text_cfg, tokenizer)
    assert cache_path(text_cfg.replace(max_documents=1), tokenizer) != cache_path(text_cfg, tokenizer)
    with_bos = ByteTokenizer()
    with_bos.add_bos, with_bos.bos_token_id = True, 1  # changes encodings, not the vocabulary fingerprint
    assert cache_path(text_cfg, with_bos) != cache_path(text_cfg, tokenizer)

    Path(text_cfg.path).write_text("bye", encoding="utf-8")  # edited source: stale cache must not be used
    np.testing.assert_array_equal(split_tokens(text_cfg, tokenizer, progress=False), [98, 121, 101, EOS])
    assert tokenizer.encoded_texts == 2


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "bad_file",
    [
        b"",
        b"not a numpy file at all",
        _npy_bytes(np.arange(8, dtype=np.int32))[:-6],  # torn write
        _npy_bytes(np.arange(8, dtype=np.float32)),  # wrong dtype
        _npy_bytes(np.arange(8, dtype=np.int32).reshape(2, 4)),  # wrong rank
    ],
    ids=["empty", "garbage", "truncated", "float", "2d"],
)
def test_corrupt_cache_is_rebuilt(text_cfg, bad_file, caplog):
    tokenizer = ByteTokenizer()
    path = cache_path(text_cfg, tokenizer)
    path.parent.mkdir(parents=True)
    path.write_bytes(bad_file)
    tokens = split_tokens(text_cfg, tokenizer, progress=False)
    assert tokenizer.encoded_texts == 1
    np.testing.assert_array_equal(tokens, [104, 0xC3, 0xA9, 108, 108, 111, 10, EOS])
    np.testing.assert_array_equal(np.load(path), tokens)  # the file was replaced by a good one
    assert "rebuilding" in caplog.text


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    source = tmp_path / "a.txt"
    source.write_text("ab")
    monkeypatch.setenv("SPARSE_LM_CACHE", str(tmp_path / "env_cache"))
    cfg = DataConfig(corpus=Corpus.textfile, path=str(source), split=Split.all)
    split_tokens(cfg, ByteTokenizer(), progress=False)
    assert len(list((tmp_path / "env_cache" / "tokens").glob("textfile-all-*.npy"))) == 1


def test_out_of_range_ids_are_rejected():
    class NegativeTokenizer(ByteTokenizer):
        def encode(self, text):
            return [-1]

    documents = load_documents(DataConfig(corpus=Corpus.web, path=str(WEB_SAMPLE)))[:1]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2\*\*31\), got \[-1, 256\]"):
        tokenize_documents(documents, NegativeTokenizer(), progress=False)
