"""File-format facts shared by the checkpoint reader and writer: safetensors dtype names and tokenizer files.

A leaf module (no other dfsmerge.io import), so the reader, the writer and the adapter builder all depend on it
and never on each other in a circle.
"""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
"""Files of a Hugging Face tokenizer (and chat template) that travel with a checkpoint."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""safetensors header dtype name -> torch dtype."""

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
