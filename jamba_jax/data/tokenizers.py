"""Tokenizers for the data pipeline: raw UTF-8 bytes, or a Hugging Face ``tokenizer.json``.

Both expose ``vocab_size``, ``eos_id``, ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and
``encode_array(str) -> np.ndarray[int32]`` (the pipeline's fast path).
"""

from __future__ import annotations

import os

import numpy as np

#: Special tokens tried, in this order, as the end-of-document token of a ``tokenizer.json``.
EOS_CANDIDATES: tuple[str, ...] = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, ``eos_id = 256``; ``vocab_size = 257``."""

    vocab_size: int = 257
    eos_id: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Ids >= 256 (EOS) and negative ids are dropped; invalid UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``.

    ``encode`` adds no special tokens (no BOS from the post-processor): the pipeline appends ``eos_id``
    after every document itself. ``decode`` skips special tokens.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        import tokenizers  # noqa: PLC0415 (optional dependency, only needed here)

        self.path = os.fspath(path)
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        for name in candidates:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                self.eos_token, self.eos_id = name, int(token_id)
                break
        else:
            if eos_token is not None:
                raise ValueError(f"tokenizer {self.path!r} has no token {eos_token!r} (the configured eos_token)")
            raise ValueError(
                f"tokenizer {self.path!r} has none of the end-of-document tokens {list(EOS_CANDIDATES)}; add one "
                "of them as a special token to the tokenizer.json, or pass eos_token=<its EOS token> to "
                "load_tokenizer")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str = "bytes", eos_token: str | None = None) -> Tokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`; a path to a ``tokenizer.json`` (or a directory holding one)
    -> :class:`HFTokenizer`, with EOS found among :data:`EOS_CANDIDATES` unless ``eos_token`` names it."""
    if spec == "bytes":
        return ByteTokenizer()
    path = os.fspath(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file (expected 'bytes' or a path to a tokenizer.json)")
    return HFTokenizer(path, eos_token=eos_token)
