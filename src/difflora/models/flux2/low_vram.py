"""blocks_to_swap on diffusers' FLUX.2 transformer: the last N blocks (single blocks first, from the end, as
musubi counts them) live on the CPU and come to the device only for their own forward, always checkpointed
(models/low_vram.py's BlockSwap moves them; this wraps diffusers' blocks, which take keyword arguments)."""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import checkpoint

from ...errors import UserError
from ..low_vram import BlockSwap

log = logging.getLogger(__name__)


def enable_block_swap(transformer, n: int, device: torch.device) -> BlockSwap:
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    if n >= len(blocks):
        raise UserError(f"blocks_to_swap = {n} but this FLUX.2 transformer has {len(blocks)} blocks; use at most "
                        f"{len(blocks) - 1}")
    swap = BlockSwap(blocks[-n:], device)
    cpu = torch.device("cpu")
    for block in blocks[-n:]:
        run = block.forward  # the class's forward, bound; the instance attribute below shadows it

        def forward(*args, _run=run, _block=block, **kwargs):
            def call(*a):
                swap._move(_block, swap.device)
                try:
                    return _run(*a, **kwargs)
                finally:
                    swap._move(_block, cpu)

            return checkpoint(call, *args, use_reentrant=False) if torch.is_grad_enabled() else call(*args)

        block.forward = forward
    log.info("blocks_to_swap: %d of %d FLUX.2 blocks stay on the CPU", n, len(blocks))
    return swap
