"""Training data: tokenizers, document sources and the Grain packing pipeline."""

from jamba_jax.data.pipeline import (BATCH_KEYS, PACKINGS, SOURCES, DataConfig, document_source, make_eval_batches,
                                     make_train_dataset, make_train_iterator)
from jamba_jax.data.sources import (ArrayRecordTextSource, JsonlSource, TextFilesSource, resolve_paths,
                                    stdlib_corpus_files)
from jamba_jax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ArrayRecordTextSource", "BATCH_KEYS", "ByteTokenizer", "DataConfig", "HFTokenizer", "JsonlSource",
           "PACKINGS", "SOURCES", "TextFilesSource", "document_source", "load_tokenizer", "make_eval_batches",
           "make_train_dataset", "make_train_iterator", "resolve_paths", "stdlib_corpus_files"]
