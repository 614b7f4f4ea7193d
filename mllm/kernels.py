"""CPU decoding kernels: linear layers whose weights are packed once for oneDNN (inference only).

Decoding multiplies a few rows (1-16 per step) by every weight matrix. On CPUs, plain `F.linear` reaches ~25 % of the
memory bandwidth at those rows; with the weight packed once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU weight freezing does) the same product runs
1.4-2x faster (`python bench/generate.py`, "kernel" lines), bitwise equal in bf16, within 1e-4 in fp32. A packed
layer has no trainable weight: it cannot train, move to another device, or be saved (its state_dict raises).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn


class PackedLinear(nn.Module):
    """`nn.Linear` for inference on a CPU with its weight packed for oneDNN: (…, in) -> (…, out), same dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # opaque oneDNN tensor
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"{prefix or 'the model'}: linear weights are packed for CPU inference (load_for_inference); "
                           "load the checkpoint again without it to save or train")  # fmt: skip

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where oneDNN packing applies: a CPU with oneDNN, fp32 weights, or bf16 ones where oneDNN computes bf16."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(module: nn.Module, skip: Collection[nn.Module] = ()) -> int:
    """Replace every `nn.Linear` inside `module` (except those in `skip`) by a `PackedLinear` -> how many. The layers
    must be on the CPU in the dtype they will run in (see `can_pack`)."""
    skipped = {id(m) for m in skip}
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and id(child) not in skipped:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
