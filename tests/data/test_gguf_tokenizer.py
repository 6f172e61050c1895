"""The SmolLM2 tokenizer rebuilt from GGUF metadata, against llama.cpp's tokenizer and real text."""

from __future__ import annotations

import pytest

from sparse_lm.data import Corpus, DataConfig, Split, load_split
from sparse_lm.data.tokenizer import ByteTokenizer
from sparse_lm.models.gguf_loader import open_gguf, smollm2_gguf_path, tokenizer_from_gguf
from tests.helpers import needs_smollm2

# Ids produced by llama.cpp's own tokenizer (llama-cpp-python 0.3.36, built from source on this machine,
# `Llama(model_path=<the SmolLM2 GGUF>, vocab_only=True).tokenize(text.encode(), add_bos=False, special=False)`).
LLAMA_CPP_IDS = [
    ("The capital of France is", [504, 3575, 282, 4649, 314]),
    (
        "In the beginning God created the heavens and the earth.",
        [788, 260, 3616, 1839, 2312, 260, 23418, 284, 260, 3103, 30],
    ),
    (
        "def f(x):\n    return x ** 2  # 12345 squared",
        [1604, 275, 24, 104, 727, 472, 1003, 1792, 1903, 216, 34, 216, 907, 216, 33, 34, 35, 36, 37, 27402],
    ),
    (
        "Hello,   world!\n\n\tTabs and  spaces; naïve café — “quotes” 2024-11-23.",
        [
            19556,
            28,
            256,
            905,
            17,
            1116,
            197,
            68,
            7366,
            284,
            216,
            5600,
            43,
            15486,
            46494,
            37366,
            1841,
            619,
            385,
            2346,
            573,
            216,
            34,
            32,
            34,
            36,
            29,
            33,
            33,
            29,
            34,
            35,
            30,
        ],
    ),
    (
        'Yahweh said to Moses, "I AM WHO I AM."',
        [73, 1287, 28479, 1137, 288, 11156, 28, 476, 57, 10974, 13614, 339, 10974, 1270],
    ),
    ("   leading spaces and trailing   ", [256, 2899, 5600, 284, 35079, 333]),
    (
        "numbers 3.14159 and 1,000,000 and 0x1F",
        [
            28707,
            216,
            35,
            30,
            33,
            36,
            33,
            37,
            41,
            284,
            216,
            33,
            28,
            32,
            32,
            32,
            28,
            32,
            32,
            32,
            284,
            216,
            32,
            104,
            33,
            54,
        ],
    ),
    ("emoji 🙂 and 中文 text", [391, 33777, 47526, 284, 216, 28589, 29184, 1694]),
    ("it's we're they'll I'd you've", [269, 506, 392, 2316, 502, 3060, 339, 6737, 346, 3543]),
]
# With special=True, llama.cpp maps control tokens to their ids, as our tokenizer does.
CHAT_TEXT, CHAT_IDS = "<|im_start|>user\nhi<|im_end|>", [1, 4093, 198, 6004, 2]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_from_gguf(open_gguf(smollm2_gguf_path()))


@needs_smollm2
@pytest.mark.real_model
@pytest.mark.parametrize("text, ids", LLAMA_CPP_IDS)
def test_ids_match_llama_cpp(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


@needs_smollm2
@pytest.mark.real_model
def test_control_tokens(tokenizer):
    assert tokenizer.encode(CHAT_TEXT) == CHAT_IDS
    assert tokenizer.decode(CHAT_IDS, skip_special_tokens=True) == "user\nhi"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (1, 2, 49152)


@needs_smollm2
@pytest.mark.real_model
@pytest.mark.real_corpus
def test_round_trips_the_whole_web_text(tokenizer):
    try:
        documents = load_split(DataConfig(corpus=Corpus.web, split=Split.all))
    except FileNotFoundError as e:  # the corpus package is part of `make setup`; say what is missing
        pytest.fail(f"WEB corpus missing: {e}")
    texts = [d.text for d in documents]
    assert len(texts) == 1189
    encoded = tokenizer.encode_batch(texts)
    mismatches = [i for i, (t, ids) in enumerate(zip(texts, encoded, strict=True)) if tokenizer.decode(ids) != t]
    assert mismatches == []
    assert 900_000 < sum(map(len, encoded)) < 1_000_000


@needs_smollm2
def test_fingerprint_is_stable_and_distinct(tokenizer):
    again = tokenizer_from_gguf(open_gguf(smollm2_gguf_path()))
    assert tokenizer.fingerprint == again.fingerprint
    assert tokenizer.fingerprint != ByteTokenizer().fingerprint


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.encode("é!") == [195, 169, 33]
    assert tok.decode([195, 169, 33, tok.eos_token_id]) == "é!"
