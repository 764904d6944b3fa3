"""Tokenizers loaded ahead of time by the task zygote, so that its forks share the vocabulary
copy-on-write. The first pipeline of a process with that path takes the preloaded one; later ones
(e.g. a canary, which may configure truncation differently) load their own."""
from __future__ import annotations

from tokenizers import Tokenizer

_PRELOADED: dict[str, Tokenizer] = {}


def preload_tokenizer(path: str) -> None:
    _PRELOADED[path] = Tokenizer.from_file(path)


def load_tokenizer(path: str) -> Tokenizer:
    return _PRELOADED.pop(path, None) or Tokenizer.from_file(path)
