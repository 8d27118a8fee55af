"""Low-VRAM storage of a frozen denoiser, with kohya's option names.

- fp8_base: every frozen Linear weight of the transformer blocks is stored in float8_e4m3fn and
  cast to the compute dtype (bf16) inside its forward; LoRA hooks see the bf16 output.
- nf4 (CUDA only, bitsandbytes): the block Linears become bitsandbytes Linear4bit (NF4).
- blocks_to_swap: N blocks live on the CPU and come to the device only for their own forward
  (and for their recomputation in backward: a swapped block is always checkpointed, so no
  activation of it keeps its device weights alive between forward and backward).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import UserError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn


class CastLinear(nn.Linear):
    """A Linear whose stored weight (fp8) is cast to the input's dtype for the matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def store_fp8(module: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every Linear weight under `module` in float8_e4m3fn (biases in compute_dtype); returns the count."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.data = m.weight.data.to(FP8)
                if m.bias is not None:
                    m.bias.data = m.bias.data.to(compute_dtype)
            m.__class__ = CastLinear
            n += 1
    return n


def store_nf4(module: nn.Module, device: torch.device) -> int:
    """Replace the block Linears by bitsandbytes NF4 layers (CUDA only)."""
    if device.type != "cuda":
        raise UserError("nf4 base weights need a CUDA device (bitsandbytes); use fp8_base on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("nf4 base weights need bitsandbytes: pip install 'difflora[cuda]'") from None
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, CastLinear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16).cpu(), requires_grad=False,
                                             quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
                setattr(parent, name, q.to(device))
                n += 1
    return n


class BlockSwap:
    """Keep `blocks` on the CPU; each comes to `device` only while it runs."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, checkpoint_others: bool = False):
        self.swapped = {id(b) for b in blocks}
        self.checkpoint_others = checkpoint_others
        self.device = torch.device(device)
        for b in blocks:
            self._move(b, torch.device("cpu"))

    def place(self, root: nn.Module, device: torch.device) -> None:
        """Move `root` to `device` except the swapped blocks, which stay on the CPU (moving the whole
        transformer first would put every block on the device at once: the peak block swap avoids)."""
        if id(root) in self.swapped:
            return
        root._apply(lambda t: t.to(device), recurse=False)  # what Module.to does, for this module's own tensors
        for child in root.children():
            self.place(child, device)

    @staticmethod
    def _move(block: nn.Module, device: torch.device) -> None:
        for p in block.parameters():
            if p.device != device:
                p.data = p.data.to(device, non_blocking=device.type == "cuda")
        for b in block.buffers():
            if b.device != device:
                b.data = b.data.to(device)

    def _call(self, block: nn.Module, *args):
        self._move(block, self.device)
        try:
            return block(*args)
        finally:
            self._move(block, torch.device("cpu"))

    def run(self, block: nn.Module, *args):
        grad = torch.is_grad_enabled()
        if id(block) in self.swapped:
            return checkpoint(self._call, block, *args, use_reentrant=False) if grad else self._call(block, *args)
        if grad and self.checkpoint_others:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def enable_block_swap(transformer, n: int, device: torch.device) -> None:
    """Swap the last n blocks (kohya swaps from the end of the single blocks backwards)."""
    blocks = transformer.blocks()
    if n <= 0:
        transformer.block_swap = None
        return
    if n >= len(blocks):
        raise UserError(f"blocks_to_swap = {n} but the transformer has {len(blocks)} blocks; use at most {len(blocks) - 1}")
    transformer.block_swap = BlockSwap(blocks[-n:], device, checkpoint_others=transformer.gradient_checkpointing)
    log.info("blocks_to_swap: %d of %d blocks stay on the CPU", n, len(blocks))
