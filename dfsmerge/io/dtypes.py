"""The one dtype map: the dtype names configs and the command line accept, their torch dtypes and their sizes.

Names as mergekit writes them (``float32``, ``float16``, ``bfloat16``, ``float64``) and its short aliases (``fp32``,
``fp16``, ``bf16``). Reading a name needs no torch; :func:`torch_dtype` imports it. (The dtype codes of file formats,
safetensors' ``F32``/``BF16`` and GGUF's types, are facts of those formats and live with them.)
"""

from __future__ import annotations

from typing import Any

from dfsmerge.errors import ConfigError

_CANONICAL = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
              "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float64": "float64"}
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

DTYPES: tuple[str, ...] = tuple(_CANONICAL)
"""Every accepted dtype name, aliases included."""


def canonical_dtype(name: str) -> str:
    """``fp32``/``fp16``/``bf16`` -> ``float32``/``float16``/``bfloat16``; any other name unchanged."""
    return _CANONICAL.get(name, name)


def torch_dtype(name: str | None):
    """``torch.dtype`` of a dtype name (``None`` stays ``None``).

    Raises:
        KeyError: not a name of :data:`DTYPES` (configs validate their names first).
    """
    if name is None:
        return None
    import torch

    return getattr(torch, _CANONICAL[name])


def parse_dtype(dtype: Any):
    """A ``torch.dtype`` from a dtype name in any case (a ``torch.dtype`` is returned as is, ``None`` stays ``None``).

    Raises:
        ConfigError: not a name of :data:`DTYPES`.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower()
    if name not in _CANONICAL:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return torch_dtype(name)


def dtype_name(dtype: Any) -> str:
    """A ``torch.dtype``'s name as ``config.json`` writes it (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(name: str, default: int = 4) -> int:
    """Bytes per element of a dtype name (``default`` for a name that is not one)."""
    return _BYTES.get(canonical_dtype(str(name)), default)
