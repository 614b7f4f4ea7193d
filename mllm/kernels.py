"""CPU decoding kernels: linear layers whose weights are packed once for oneDNN (inference only).

Decoding multiplies a few rows (1-16 per step) by every weight matrix. On CPUs, plain `F.linear` reaches ~25 % of the
memory bandwidth at those rows; with the weight packed once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU weight freezing does) the same product runs
1.4-2x faster (`python bench/generate.py`, "kernel" lines), bitwise equal in bf16, within 1e-4 in fp32. A packed
layer has no trainable weight: it cannot train, move to another device, or be saved (its state_dict raises).

With the weights packed, a batch-1 step of the HF decoder body spent most of its time in ~40 small eager ops per
layer, not in the products. `FusedDecoder` runs a Llama-family body (SmolLM2, Qwen2.5, Vicuna) in ~15 per layer:
q|k|v and gate|up as one packed product each, RMSNorm weights folded into them, the residual adds as oneDNN post-ops,
keys and values written into a preallocated `KVCache` (`python bench/generate.py`: "ours unfused" vs "ours", and
"decoder products": the step's products alone).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
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


# ---------------------------------------------------------------------------------------------------- fused decoder

FUSABLE = ("llama", "qwen2")  # HF decoder bodies whose layers `FusedDecoder` runs (SmolLM2, Vicuna: llama)


class MovedWeight(nn.Module):
    """Stands where a decoder linear layer was once `FusedDecoder` took its weight: calling it is an error."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"{self.name}: this weight was packed into the fused decoder (prepare_for_decoding); "
                           "run the decoder through SemHiTokLM.backbone")  # fmt: skip

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        PackedLinear._save_to_state_dict(self, destination, prefix, keep_vars)


def fusion_blocker(decoder: nn.Module) -> str | None:
    """Why `FusedDecoder` cannot run this HF decoder body (None: it can): its architecture, activation, attention
    pattern, or LoRA layers that are not merged."""
    config = getattr(decoder, "config", None)
    if getattr(config, "model_type", None) not in FUSABLE:
        return f"model type {getattr(config, 'model_type', None)!r} (fusable: {', '.join(FUSABLE)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    for layer in decoder.layers:
        for _, _, module in _linears(layer):
            if not isinstance(_plain(module), nn.Linear) or (module is not _plain(module) and not module.merged):
                return f"{type(module).__name__} layers that are not plain or merged linears"
    return None


LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _linears(layer: nn.Module):
    """(owner module, attribute name, linear module) of every linear layer of an HF decoder layer (`LINEARS`)."""
    for part, names in LINEARS:
        owner = getattr(layer, part)
        for name in names:
            yield owner, name, getattr(owner, name)


def _plain(module: nn.Module) -> nn.Module:
    """The nn.Linear inside a (merged) PEFT LoRA layer, or the module itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _pack(*linears: nn.Module, scale: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Weights (out_i, in) of plain linears stacked along out, times `scale` (in,) per input feature (an RMSNorm's
    weight folded in, multiplied in fp32) -> (oneDNN-packed weight, stacked bias or None)."""
    plain = [_plain(m) for m in linears]
    weight = torch.cat([m.weight.detach() for m in plain]) if len(plain) > 1 else plain[0].weight.detach()
    if scale is not None:
        weight = (weight.float() * scale.detach().float()).to(weight.dtype)
    biases = [m.bias for m in plain]
    bias = None if all(b is None for b in biases) else torch.cat([
        b.detach() if b is not None else weight.new_zeros(m.out_features) for m, b in zip(plain, biases, strict=True)])
    return torch.ops.mkldnn._reorder_linear_weight(weight), bias


class KVCache:
    """Every layer's keys and values in preallocated tensors (R, H_kv, capacity, d), written in place (no `cat` per
    step); `length` positions are filled. The capacity doubles when a call needs more."""

    def __init__(self, layers: int, rows: int, heads: int, head_dim: int, capacity: int, like: Tensor):
        self.keys = [like.new_empty(rows, heads, capacity, head_dim) for _ in range(layers)]
        self.values = [like.new_empty(rows, heads, capacity, head_dim) for _ in range(layers)]
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, extra: int) -> None:
        """Room for `extra` more positions (the capacity at least doubles when it grows)."""
        capacity = self.keys[0].shape[2]
        if self.length + extra <= capacity:
            return
        grown = max(2 * capacity, self.length + extra)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(*old.shape[:2], grown, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def batch_select_indices(self, rows: Tensor) -> None:
        """Keep only `rows` (R',) int64 (HF `Cache` method name: `DecodingRows.keep`)."""
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                store[i] = old.index_select(0, rows)


class FusedLayer:
    """One decoder layer's weights for `FusedDecoder`: q, k, v packed as one matrix, gate and up as another (one
    product of 2·inner columns is faster here than two, even with SiLU and the gate product as post-ops), o and down
    adding the residual as a oneDNN post-op."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.eps1, self.eps2 = (torch.tensor(n.variance_epsilon, dtype=torch.float32) for n in (norm1, norm2))
        self.qkv, self.qkv_bias = _pack(attn.q_proj, attn.k_proj, attn.v_proj, scale=norm1.weight)
        self.o, self.o_bias = _pack(attn.o_proj)
        self.gate_up, self.gate_up_bias = _pack(mlp.gate_proj, mlp.up_proj, scale=norm2.weight)
        self.inner = _plain(mlp.gate_proj).out_features
        self.down, self.down_bias = _pack(mlp.down_proj)


def _rms_scaled(x: Tensor, eps: Tensor) -> Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim (RMSNorm without its weight, which the next product holds), in
    5 small ops: one torch RMSNorm call runs ~10 on a CPU."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return x * torch.rsqrt(torch.addcmul(eps, norm, norm, value=1 / x.shape[-1])).to(x.dtype)


class FusedDecoder:
    """A Llama-family HF decoder body (`FUSABLE`; SmolLM2, Qwen2.5, Vicuna) for inference on a CPU, with LoRA merged:
    per layer one RMSNorm op, one packed q|k|v product, rotary embedding on q and k together (3 ops), keys and values
    written into a preallocated `KVCache`, SDPA (a one-position step folds each KV head's query group into the query
    length, so no key is repeated), and o, gate, up, down as packed oneDNN products whose post-ops apply the residual
    adds, SiLU and the gate product. About 15 ops per layer where the HF layer runs ~40 (the eager ops, not the
    weights, were most of a batch-1 step's time; `bench/generate.py`). Same function as the HF body: hidden states
    within bf16 rounding of it (fp32: 1e-4; tested), left- or right-padded rows alike. Built by
    `SemHiTokLM.prepare_for_decoding`, which moves the weights here (the HF layers keep `MovedWeight` stubs)."""

    def __init__(self, decoder: nn.Module):
        reason = fusion_blocker(decoder)
        if reason is not None:
            raise ValueError(f"FusedDecoder cannot run this decoder: {reason}")
        config = decoder.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [FusedLayer(layer) for layer in decoder.layers[: config.num_hidden_layers]]
        self.norm, self.eps = decoder.norm.weight.detach(), decoder.norm.variance_epsilon
        self.rotary = decoder.rotary_emb
        half = self.head_dim // 2
        self.sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.norm)  # rotate_half's signs

    def move_weights(self, decoder: nn.Module) -> int:
        """Replace the HF layers' linear modules by `MovedWeight` stubs (their weights live here now) -> layers."""
        for i, layer in enumerate(decoder.layers):
            for owner, name, _ in list(_linears(layer)):
                setattr(owner, name, MovedWeight(f"layers.{i}.{name}"))
        return len(decoder.layers)

    def new_cache(self, rows: int, capacity: int, like: Tensor) -> KVCache:
        return KVCache(len(self.layers), rows, self.kv_heads, self.head_dim, capacity, like)

    def __call__(self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, extra_capacity: int = 256) -> tuple[Tensor, KVCache | None]:  # fmt: skip
        """inputs_embeds (R, Q, D), attention_mask (R, past + Q) 0/1 over the cached and new positions (None: all
        ones), position_ids (R, Q) (None: past .. past + Q - 1) and a cache from an earlier call (None: start one
        holding these Q positions, or none at all with extra_capacity < 0) -> (hidden after the final norm (R, Q, D),
        the cache)."""
        rows, q, dim = x.shape
        past = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + q, device=x.device).expand(rows, q)
        if cache is None and extra_capacity >= 0:
            cache = self.new_cache(rows, q + extra_capacity, x)
        if cache is not None:
            cache.reserve(q)
        mask = self._mask(attention_mask, past, q, x)
        cos, sin = self.rotary(x, position_ids)  # (R, Q, d) each, in x's dtype
        cos, sin = cos[:, :, None], (sin * self.sign)[:, :, None]
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        linear, binary = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._linear_pointwise.binary
        for i, layer in enumerate(self.layers):
            qkv = linear(_rms_scaled(x, layer.eps1), layer.qkv, layer.qkv_bias, "none", [], "")
            qk, values = qkv.view(rows, q, h + 2 * hk, d).split((h + hk, hk), 2)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)  # rotate_half(x) * sin = roll(x) * (±sin)
            query, keys = qk.split((h, hk), 2)
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (R, H_kv, Q, d)
            if cache is not None:
                cache.keys[i].narrow(2, past, q).copy_(keys)
                cache.values[i].narrow(2, past, q).copy_(values)
                keys, values = cache.keys[i].narrow(2, 0, past + q), cache.values[i].narrow(2, 0, past + q)
            x = binary(self._attend(query, keys, values, mask), x, layer.o, layer.o_bias, "add")
            gate, up = linear(_rms_scaled(x, layer.eps2), layer.gate_up, layer.gate_up_bias, "none", [], "").split(
                layer.inner, -1)  # fmt: skip
            x = binary(F.silu(gate).mul_(up), x, layer.down, layer.down_bias, "add")
        if cache is not None:
            cache.length = past + q
        return F.rms_norm(x, (dim,), self.norm, self.eps), cache

    def _mask(self, attention_mask: Tensor | None, past: int, q: int, like: Tensor) -> Tensor | None:
        """Additive SDPA mask in x's dtype (0 = attend, -inf = not; built once per call, as SDPA would convert a
        boolean one in every layer): (R, 1, 1, T) for a one-position step, (R, 1, Q, T) causal otherwise; a query
        position that may attend nothing (a left pad) attends itself, so no NaN reaches a real position."""
        total, device = past + q, like.device
        keep = None if attention_mask is None else attention_mask[:, -total:].bool()[:, None, None, :]
        if q > 1:
            causal = torch.ones(q, total, dtype=torch.bool, device=device).tril(past)
            own = torch.arange(total, device=device) == torch.arange(past, total, device=device)[:, None]  # (Q, T)
            keep = causal if keep is None else (causal & keep) | own
        if keep is None:
            return None
        return torch.zeros(keep.shape, dtype=like.dtype, device=device).masked_fill_(~keep, float("-inf"))

    def _attend(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        """query (R, Q, H, d), keys / values (R, H_kv, T, d) -> (R, Q, H·d)."""
        rows, q, h, d = query.shape
        if q == 1:  # the H / H_kv query heads of one KV head as H / H_kv query positions of it
            out = F.scaled_dot_product_attention(query.view(rows, self.kv_heads, h // self.kv_heads, d), keys, values,
                                                 attn_mask=mask)  # fmt: skip
            return out.reshape(rows, 1, h * d)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=self.kv_heads != h)  # fmt: skip
        return out.transpose(1, 2).reshape(rows, q, h * d)
