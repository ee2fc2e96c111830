"""Training / eval batches from a document source, with Grain.

Train pipeline (all stages deterministic given the seed; the iterator state is a small JSON-able dict)::

    documents (MapDataset[str])                 stdlib / text / jsonl / array_record, lazily read
      -> shuffle(seed) -> repeat()               a fresh permutation every epoch (seed + epoch)
      -> [process_index::process_count]          this host's slice of the shuffled document stream
      -> tokenize                                ids = encode(doc) + [eos]; inputs = ids[:-1], targets = ids[1:]
      -> to_iter_dataset -> pack -> batch -> model batch dict   [-> mp_prefetch if num_workers > 0]

Packing convention (shift first, then pack): a document of n tokens plus EOS gives n (input, target)
pairs ``(ids[t], ids[t+1])``. These pairs are packed into rows of ``seq_len``; a document longer than a
row is split into pieces at pair boundaries, so no target is lost at a split and every packed position
holds a real next-token target of the same document: ``loss_mask = (segment_ids > 0)``. Pieces get
``segment_ids`` 1, 2, 3, ... within a row and ``positions`` restarting at 0 per piece (what
``jamba_jax.ops.positions_from_segments`` computes); padding has ``segment_ids = 0``, ``loss_mask = 0``,
and zeros elsewhere. The first token of a document is never a target (there is no BOS).
"""

from __future__ import annotations

import dataclasses
import grain
import numpy as np

from jamba_jax.data.sources import (ArrayRecordTextSource, DocumentSubset, JsonlSource, TextFilesSource,
                                    held_out_documents, resolve_paths, stdlib_corpus_files)
from jamba_jax.data.tokenizers import Tokenizer

SOURCES: tuple[str, ...] = ("stdlib", "text", "jsonl", "array_record")
PACKINGS: tuple[str, ...] = ("concat", "first_fit")
BATCH_KEYS: tuple[str, ...] = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")

_JSONL_SUFFIXES = (".jsonl", ".json")
_ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
# Seed of the fixed shuffle that picks eval documents (independent of the training seed).
_EVAL_SEED = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the documents come from and how they are tokenized and read.

    ``source``: ``"stdlib"`` (the running interpreter's standard library, split by
    :func:`stdlib_corpus_files`), ``"text"`` (one document per file), ``"jsonl"`` (one document per line,
    field ``text_field``) or ``"array_record"`` (one UTF-8 document per record). ``path`` / ``eval_path``:
    a file, a directory or a glob; without ``eval_path``, ``eval_fraction`` of ``path``'s documents
    (`held_out_documents`) are held out of training for eval. ``packing``: ``"concat"``
    (concat-then-split, rows completely full) or ``"first_fit"`` (pieces of at most ``seq_len`` placed
    whole into rows; some padding, but a document that fits a row is never split).
    """

    source: str = "stdlib"
    path: str | None = None
    eval_path: str | None = None
    text_field: str = "text"
    tokenizer: str = "bytes"
    shuffle: bool = True
    num_workers: int = 0
    eval_fraction: float = 0.05
    max_documents: int | None = None
    packing: str = "concat"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source={self.source!r}: must be one of {list(SOURCES)}")
        if self.source != "stdlib" and not self.path:
            raise ValueError(f"DataConfig.source={self.source!r} needs DataConfig.path (a file, directory or glob)")
        if self.source == "stdlib" and self.eval_path:
            raise ValueError("DataConfig.eval_path is for text / jsonl / array_record sources: the stdlib "
                             "source holds out eval_fraction of its files")
        if self.packing not in PACKINGS:
            raise ValueError(f"DataConfig.packing={self.packing!r}: must be one of {list(PACKINGS)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_fraction={self.eval_fraction!r}: must be in (0, 1)")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers={self.num_workers!r}: must be >= 0")
        if self.max_documents is not None and self.max_documents <= 0:
            raise ValueError(f"DataConfig.max_documents={self.max_documents!r}: must be positive or None")


# ----------------------------------------------------------------------------------------------- sources

def document_source(cfg: DataConfig, split: str = "train"):
    """The random-access source of documents (``str``) of ``split`` ("train" or "eval")."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: must be 'train' or 'eval'")
    if cfg.source == "stdlib":
        train_files, eval_files = stdlib_corpus_files(cfg.eval_fraction)
        files = train_files if split == "train" else eval_files
        if not files:
            raise ValueError(f"stdlib corpus: the {split} split is empty (eval_fraction={cfg.eval_fraction})")
        return TextFilesSource(files, what=f"stdlib {split}")
    if cfg.eval_path is not None:
        return _file_source(cfg, cfg.path if split == "train" else cfg.eval_path, f"{cfg.source} {split} data")
    source = _file_source(cfg, cfg.path, f"{cfg.source} data")
    held_out = held_out_documents(len(source), cfg.eval_fraction)
    indices = np.flatnonzero(held_out if split == "eval" else ~held_out)
    if not len(indices):
        raise ValueError(f"{cfg.source} data {cfg.path!r}: eval_fraction={cfg.eval_fraction} of its {len(source)} "
                         f"documents leaves the {split} split empty; set data.eval_path (held-out data) "
                         f"or change data.eval_fraction")
    return DocumentSubset(source, indices)


def _file_source(cfg: DataConfig, path: str, what: str):
    if cfg.source == "text":
        return TextFilesSource(resolve_paths(path, what=what), what=f"{what} {path!r}")
    if cfg.source == "jsonl":
        return JsonlSource(resolve_paths(path, what=what, suffixes=_JSONL_SUFFIXES), cfg.text_field,
                           what=f"{what} {path!r}")
    return ArrayRecordTextSource(resolve_paths(path, what=what, suffixes=_ARRAY_RECORD_SUFFIXES),
                                 what=f"{what} {path!r}")


def _documents(cfg: DataConfig, split: str) -> grain.MapDataset:
    ds = grain.MapDataset.source(document_source(cfg, split))
    if cfg.max_documents is not None:
        ds = ds[: cfg.max_documents]
    return ds


# ------------------------------------------------------------------------------------------ transforms

class _TokenizeDocument:
    """``str -> {"inputs": ids[:-1], "targets": ids[1:]}`` with ``ids = encode(doc) + [eos]`` (int32)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        encode_array = getattr(self.tokenizer, "encode_array", None)  # any object with encode/eos_id works
        ids = encode_array(text) if encode_array is not None else self.tokenizer.encode(text)
        ids = np.append(np.asarray(ids, dtype=np.int32), np.int32(self.tokenizer.eos_id))
        return {"inputs": ids[:-1], "targets": ids[1:]}


def _has_tokens(example: dict[str, np.ndarray]) -> bool:
    return len(example["inputs"]) > 0


class _SplitIntoPieces(grain.experimental.FlatMapTransform):
    """Splits an example into consecutive pieces of at most ``seq_len`` pairs (for first-fit packing)."""

    max_fan_out = 1 << 30  # not enforced by FlatMapIterDataset; documents may be arbitrarily long

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, example):
        n = len(example["inputs"])
        return [{k: v[i:i + self.seq_len] for k, v in example.items()} for i in range(0, n, self.seq_len)]


def _to_model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    return {
        "input_ids": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


class _JsonStateIterator(grain.DatasetIterator):
    """Wraps ConcatThenSplit's iterator so that its state survives a JSON round trip: grain 0.2.18 tests
    "no remainder" with ``slice == (-1, -1)``, which a JSON list never equals, so without this a restored
    iterator would treat the next document as an empty remainder and drop it."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state(dict(state, remainder_slices=slices))


class _JsonStateIterDataset(grain.IterDataset):
    """Passes elements through; see _JsonStateIterator."""

    def __iter__(self):
        return _JsonStateIterator(self._parent.__iter__())


def _pack(ds: grain.IterDataset, cfg: DataConfig, seq_len: int, *, seed: int, shuffle_bins: bool,
          num_bins: int) -> grain.IterDataset:
    lengths = {"inputs": seq_len, "targets": seq_len}
    if cfg.packing == "concat":
        return _JsonStateIterDataset(grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths))
    ds = grain.experimental.FlatMapIterDataset(ds, _SplitIntoPieces(seq_len))
    return grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=num_bins,
                                                     seed=seed, shuffle_bins=shuffle_bins)


def _read_options() -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18's multiprocessing reads an absl flag, which fails in a program that does not parse absl
    flags (google/grain#1355, fixed upstream after 0.2.18); marking the flags parsed keeps their defaults."""
    from absl import flags  # noqa: PLC0415 (grain's own dependency)

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_positive(**kwargs):
    for name, value in kwargs.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be a positive integer")


# -------------------------------------------------------------------------------------------- public

def make_train_dataset(cfg: DataConfig, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                       seed: int = 0, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite training ``grain.IterDataset`` behind :func:`make_train_iterator`."""
    _check_positive(seq_len=seq_len, global_batch_size=global_batch_size, process_count=process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                         f"process_count={process_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: must be in [0, 2**32)")
    local_batch = global_batch_size // process_count
    ds = _documents(cfg, "train")
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)  # ShuffleMapDataset reshuffles with seed + epoch for indices past len
    ds = ds.repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(_TokenizeDocument(tokenizer)).filter(_has_tokens)
    ids = _pack(ds.to_iter_dataset(_read_options()), cfg, seq_len, seed=seed, shuffle_bins=cfg.shuffle,
                num_bins=max(2 * local_batch, 16))
    ids = ids.batch(local_batch, drop_remainder=True).map(_to_model_batch)
    # filter_raise_threshold_ratio: a corpus whose documents are all empty would otherwise spin forever
    # looking for a non-empty one. min_shm_size: worker batches come back copied, not as shared-memory
    # arrays (those leak and warn at interpreter exit when an iterator is not closed; a copy is cheap).
    ids = grain.experimental.WithOptionsIterDataset(
        ids, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=0.999, min_shm_size=1 << 30))
    if cfg.num_workers > 0:
        _allow_unparsed_absl_flags()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return ids


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                        seed: int = 0, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of this host's training batches.

    ``next(it)`` is a dict of numpy arrays of shape ``(global_batch_size // process_count, seq_len)``:
    ``input_ids``, ``targets``, ``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32); see
    the module docstring for the packing convention. Same arguments -> same batches. ``it.get_state()``
    is a JSON-serialisable dict; ``set_state`` on a fresh iterator built with the same arguments
    continues the stream exactly (checkpoint it with ``grain.checkpoint.CheckpointSave(it)``).
    """
    return iter(make_train_dataset(cfg, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count))


def make_eval_batches(cfg: DataConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int) -> list[dict[str, np.ndarray]]:
    """A deterministic list of up to ``num_batches`` eval batches (same dicts as training, ``(batch_size,
    seq_len)``), from ``cfg.eval_path`` or else the held-out split (``eval_fraction``).

    Documents are read once, in a fixed shuffled order (seed independent of training) when
    ``cfg.shuffle``, else in source order. When they run out, the last batch is completed with padding
    rows (``loss_mask = 0``) and fewer than ``num_batches`` batches are returned.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    ds = _documents(cfg, "eval")
    if cfg.shuffle:
        ds = ds.shuffle(seed=_EVAL_SEED)
    ds = ds.map(_TokenizeDocument(tokenizer)).filter(_has_tokens)
    ids = _pack(ds.to_iter_dataset(_read_options()), cfg, seq_len, seed=_EVAL_SEED, shuffle_bins=False,
                num_bins=max(2 * batch_size, 16))
    ids = ids.batch(batch_size, drop_remainder=False).map(_to_model_batch)
    batches = []
    for batch in ids:
        rows = batch["input_ids"].shape[0]
        if rows < batch_size:
            batch = {k: np.concatenate([v, np.zeros((batch_size - rows, seq_len), v.dtype)]) for k, v in batch.items()}
        batches.append(batch)
        if len(batches) == num_batches:
            break
    if not batches:
        raise ValueError(f"{cfg.source} eval data has no tokens")
    return batches
