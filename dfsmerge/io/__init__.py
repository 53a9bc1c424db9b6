"""Checkpoint I/O: lazy reading (:func:`open_checkpoint`) and sharded atomic writing (:class:`ShardedWriter`)."""

from dfsmerge.io.reader import TOKENIZER_FILES, CheckpointReader, open_checkpoint, resolve_model_path
from dfsmerge.io.writer import ShardedWriter, copy_tokenizer, parse_size

__all__ = ["TOKENIZER_FILES", "CheckpointReader", "ShardedWriter", "copy_tokenizer", "open_checkpoint",
           "parse_size", "resolve_model_path"]
