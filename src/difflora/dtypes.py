"""Precision names users write (save_precision, --dtype, --precision) and the torch dtypes they mean."""

from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "float": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def dtype_named(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown precision {name!r}; use fp32 (or float), fp16 or bf16")
    return DTYPES[name]
