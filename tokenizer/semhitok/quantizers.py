"""Vector quantizers. Every one returns `QuantizerOutput` and nothing else.

- `EMAQuantizer`: semantic codebook (K, d_sem); cosine nearest neighbour, EMA updates, k-means/data/random init,
  dead-code restart (DESIGN §3.1).
- `SubCodebookQuantizer`: texture codebook (K, m, d_pix); a patch with semantic index i searches C[i] only, O(m*d)
  per patch. Trained by gradient (codebook + commitment losses, straight-through estimator); EMA counts per (i, j)
  only drive usage stats and dead-code restarts, which draw from pixel features routed to the same i (§3.2).
- `HierarchicalQuantizer(semantic=..., texture=...)`: the SemHiTok composition; flat index f = i * m + j
  (`TokenGrid.flat_index`).
- `FlatQuantizer` (one codebook of K*m joint vectors, nearest neighbour over all of them) and
  `SharedIndexQuantizer` (TokenFlow-style: one index into K*m (semantic, pixel) pairs chosen by a weighted sum of
  both distances) are the baselines with the same vocabulary.

The stage-2 quantizers (hierarchical, flat, shared) share one interface: `forward(z)` with z = cat(z_sem, z_pix)
(B, L, d_sem + d_pix), indices in [0, K*m), `lookup(indices)`, `num_codes`, `dims`.
Statistics update only in training mode; under torch.distributed counts and sums are all-reduced and restarts are
broadcast from rank 0, so every rank holds the same codebook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from semhitok.types import QuantizerOutput, TokenGrid

MAX_DISTANCE_ELEMENTS = 2**26  # largest (rows, codes) distance block computed at once


# --------------------------------------------------------------------------------------------------- helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast_(*tensors: Tensor) -> None:
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def _ema_(average: Tensor, new: Tensor, decay: float) -> None:
    average.mul_(decay).add_(new, alpha=1.0 - decay)


def _straight_through(z: Tensor, q: Tensor) -> Tensor:
    return z + (q - z).detach()


def _counts(indices: Tensor, num_codes: int, reduce: bool) -> Tensor:
    """Histogram of `indices` as float (num_codes,); all-reduced when `reduce` (training: every rank calls it)."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    return _all_reduce_(counts) if reduce else counts


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code histogram: 1 = one code used, N = all N used evenly."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())


def _sample_rows(x: Tensor, n: int) -> Tensor:
    """n random rows of x (N, d), with replacement only when N < n."""
    if x.shape[0] >= n:
        return x[torch.randperm(x.shape[0], device=x.device)[:n]]
    return x[torch.randint(x.shape[0], (n,), device=x.device)]


def chunked_argmin(x: Tensor, codes: Tensor, distance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Row-wise argmin of distance(x, codes) (N, num_codes) without materialising more than 2**26 entries."""
    step = max(1, MAX_DISTANCE_ELEMENTS // codes.shape[0])
    with torch.autocast(x.device.type, enabled=False):  # nearest neighbours in full precision
        return torch.cat([distance(chunk, codes).argmin(dim=-1) for chunk in x.split(step)])


def neg_cosine(x: Tensor, codes: Tensor) -> Tensor:
    return -(x @ codes.t())  # (n, K); both l2-normalised


def squared_l2(x: Tensor, codes: Tensor) -> Tensor:
    return x.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2.0 * x @ codes.t()  # (n, N)


@torch.no_grad()
def kmeans_cosine(x: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Spherical k-means on l2-normalised x (N, d) -> (centroids (k, d), cluster sizes (k,))."""
    centroids = _sample_rows(x, k)
    for _ in range(iters):
        assign = chunked_argmin(x, centroids, neg_cosine)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
    return centroids, torch.bincount(chunked_argmin(x, centroids, neg_cosine), minlength=k).float()


# ------------------------------------------------------------------------------------------ semantic (EMA) VQ


class EMAQuantizer(nn.Module):
    """Cosine VQ with an EMA codebook (K, d): codes are unit vectors, z is l2-normalised before the search."""

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        init: str = "kmeans",
        init_batches: int = 1,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
    ):
        super().__init__()
        if init not in ("kmeans", "data", "random"):
            raise ValueError(f"init must be 'kmeans', 'data' or 'random', got {init!r}")
        self.num_codes, self.dim, self.decay, self.init = num_codes, dim, decay, init
        self.init_batches, self.kmeans_iters, self.dead_code_threshold = init_batches, kmeans_iters, dead_code_threshold
        embed = F.normalize(torch.randn(num_codes, dim), dim=-1)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("initted", torch.tensor(init == "random"))
        self._init_pool: list[Tensor] = []  # features gathered for a data/k-means init (never saved)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, L, d) -> z_q (B, L, d) unit vectors, indices (B, L) in [0, K)."""
        z = F.normalize(z.to(self.embed.dtype), dim=-1)  # search and statistics in the codebook's precision
        flat = z.detach().reshape(-1, self.dim)  # (B*L, d)
        if self.training and not self.initted:
            self._collect_for_init(flat)
        idx = chunked_argmin(flat, self.embed, neg_cosine)  # (B*L,)
        q = self.embed[idx].view_as(z)
        counts = _counts(idx, self.num_codes, self.training)
        if self.training and self.initted:
            self._ema_update(flat, idx, counts)
            self._restart_dead(flat)
        losses = {"commit": F.mse_loss(z, q)}
        return QuantizerOutput(_straight_through(z, q), idx.view(z.shape[:-1]), losses, self._stats(counts))

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (...) in [0, K) -> code vectors (..., d)."""
        return self.embed[indices]

    @torch.no_grad()
    def _collect_for_init(self, flat: Tensor) -> None:
        self._init_pool.append(flat.clone())
        if len(self._init_pool) < self.init_batches:
            return
        data, self._init_pool = torch.cat(self._init_pool), []
        if self.init == "kmeans":
            embed, sizes = kmeans_cosine(data, self.num_codes, self.kmeans_iters)
        else:
            embed, sizes = _sample_rows(data, self.num_codes), torch.ones(self.num_codes, device=data.device)
        self.embed.copy_(embed)
        self.embed_sum.copy_(embed * sizes[:, None])
        self.cluster_size.copy_(sizes)
        self.initted.fill_(True)
        _broadcast_(self.embed, self.embed_sum, self.cluster_size)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor, counts: Tensor) -> None:
        sums = _all_reduce_(torch.zeros_like(self.embed).index_add_(0, idx, flat))  # (K, d)
        _ema_(self.cluster_size, counts, self.decay)
        _ema_(self.embed_sum, sums, self.decay)
        norm = self.embed_sum.norm(dim=-1, keepdim=True)
        self.embed.copy_(torch.where(norm > 1e-12, self.embed_sum / norm.clamp_min(1e-12), self.embed))

    @torch.no_grad()
    def _restart_dead(self, flat: Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold  # (K,), identical on every rank
        n = int(dead.sum())
        if n == 0:
            return
        fresh = _sample_rows(flat, n)
        self.embed[dead] = fresh
        self.embed_sum[dead] = fresh * self.dead_code_threshold
        self.cluster_size[dead] = self.dead_code_threshold
        _broadcast_(self.embed, self.embed_sum, self.cluster_size)

    def _stats(self, counts: Tensor) -> dict[str, Tensor]:
        alive = self.cluster_size >= max(self.dead_code_threshold, 1e-12)
        return {
            "usage": alive.float().mean(),  # codes alive by EMA count
            "batch_usage": (counts > 0).float().mean(),
            "perplexity": perplexity(counts),
        }


# ------------------------------------------------------------------------------------------ texture sub-codebooks


class SubCodebookQuantizer(nn.Module):
    """Texture codes C (K, m, d): semantic code i owns C[i]; codes are l2-normalised when used."""

    def __init__(self, num_semantic: int, codes_per_semantic: int, dim: int, dead_code_ratio: float = 0.03,
                 decay: float = 0.99):
        super().__init__()
        self.num_semantic, self.m, self.dim = num_semantic, codes_per_semantic, dim
        self.dead_code_ratio, self.decay = dead_code_ratio, decay
        self.codebook = nn.Parameter(F.normalize(torch.randn(num_semantic, codes_per_semantic, dim), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(num_semantic, codes_per_semantic))

    def candidates(self, semantic_indices: Tensor) -> Tensor:
        """semantic_indices (N,) -> their sub-codebooks (N, m, d), normalised; gathers only the rows asked for."""
        return F.normalize(self.codebook[semantic_indices], dim=-1)

    def forward(self, z: Tensor, semantic_indices: Tensor) -> QuantizerOutput:
        """z (B, L, d), semantic_indices (B, L) -> z_q (B, L, d), texture indices (B, L) in [0, m)."""
        z = F.normalize(z.to(self.codebook.dtype), dim=-1)
        flat, sem = z.reshape(-1, self.dim), semantic_indices.reshape(-1)  # (N, d), (N,)
        codes = self.candidates(sem)  # (N, m, d)
        j = (flat.detach()[:, None, :] - codes.detach()).pow(2).sum(-1).argmin(-1)  # (N,)
        q = codes[torch.arange(len(j), device=j.device), j]  # (N, d), differentiable w.r.t. the codebook
        pairs = TokenGrid.flat_index(sem, j, self.m)  # (N,) in [0, K*m)
        counts = _counts(pairs, self.num_semantic * self.m, self.training).view(self.num_semantic, self.m)
        if self.training:
            self._update(counts, flat.detach(), sem)
        losses = {"codebook": F.mse_loss(q, flat.detach()), "commit": F.mse_loss(flat, q.detach())}
        z_q = _straight_through(flat, q).view_as(z)
        return QuantizerOutput(z_q, j.view(semantic_indices.shape), losses, self._stats(counts))

    def lookup(self, semantic_indices: Tensor, texture_indices: Tensor) -> Tensor:
        """(…) semantic, (…) texture indices -> texture code vectors (…, d)."""
        return F.normalize(self.codebook[semantic_indices, texture_indices], dim=-1)

    @torch.no_grad()
    def _update(self, counts: Tensor, flat: Tensor, sem: Tensor) -> None:
        _ema_(self.cluster_size, counts, self.decay)
        dead = self._dead() & (counts.sum(1, keepdim=True) > 0)  # (K, m): only rows seen in this (global) batch
        if dead.any():
            self._restart(dead, flat, sem)
            _broadcast_(self.codebook.data, self.cluster_size)

    def _dead(self) -> Tensor:
        return self.cluster_size < self.dead_code_ratio * self.cluster_size.mean(1, keepdim=True)

    def _restart(self, dead: Tensor, flat: Tensor, sem: Tensor) -> None:
        """Re-seed each dead (i, j) with a random local pixel feature whose semantic index is i."""
        local = torch.bincount(sem, minlength=self.num_semantic)  # (K,)
        rows, cols = dead.nonzero(as_tuple=True)
        keep = local[rows] > 0
        rows, cols = rows[keep], cols[keep]
        starts = local.cumsum(0) - local  # first position of each row in the sorted order
        offset = (torch.rand(len(rows), device=flat.device) * local[rows]).long()
        pick = sem.argsort(stable=True)[starts[rows] + offset]  # (n_dead,) feature index with sem == row
        self.codebook.data[rows, cols] = flat[pick].to(self.codebook.dtype)
        self.cluster_size[rows, cols] = self.cluster_size[rows].mean(1)

    def _stats(self, counts: Tensor) -> dict[str, Tensor]:
        used_rows = self.cluster_size.sum(1) > 0
        alive = ~self._dead() & (self.cluster_size > 0)
        batch_rows = counts.sum(1) > 0
        return {
            "usage": alive[used_rows].float().mean() if used_rows.any() else counts.new_zeros(()),
            "batch_usage": (counts[batch_rows] > 0).float().mean() if batch_rows.any() else counts.new_zeros(()),
            "perplexity": perplexity(counts.flatten()),
        }


# ------------------------------------------------------------------------------------------ stage-2 quantizers


class HierarchicalQuantizer(nn.Module):
    """SemHiTok: semantic EMA VQ, then the texture code searched only in the chosen semantic code's sub-codebook."""

    def __init__(self, semantic: EMAQuantizer, texture: SubCodebookQuantizer):
        super().__init__()
        if texture.num_semantic != semantic.num_codes:
            raise ValueError(f"texture codebook has {texture.num_semantic} rows but semantic K = {semantic.num_codes}")
        self.semantic, self.texture = semantic, texture
        self.m = texture.m
        self.num_codes = semantic.num_codes * texture.m
        self.dims = (semantic.dim, texture.dim)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, L, d_sem + d_pix) -> z_q (same), indices f = i * m + j (B, L) in [0, K*m)."""
        z_sem, z_pix = z.split(self.dims, dim=-1)
        sem = self.semantic(z_sem)
        tex = self.texture(z_pix, sem.indices)
        losses = {**_prefix("semantic", sem.losses), **_prefix("texture", tex.losses)}
        stats = {**_prefix("semantic", sem.stats), **_prefix("texture", tex.stats)}
        indices = TokenGrid.flat_index(sem.indices, tex.indices, self.m)  # (B, L)
        return QuantizerOutput(torch.cat([sem.z_q, tex.z_q], -1), indices, losses, stats)

    def lookup(self, indices: Tensor) -> Tensor:
        """f (...) in [0, K*m) -> (..., d_sem + d_pix)."""
        i, j = TokenGrid.split_index(indices, self.m)
        return torch.cat([self.semantic.lookup(i), self.texture.lookup(i, j)], dim=-1)


def _prefix(name: str, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{name}/{k}": v for k, v in terms.items()}


class FlatQuantizer(nn.Module):
    """Baseline: one codebook of `num_codes` joint vectors (d_sem + d_pix), squared-L2 nearest neighbour over all
    of them (O(K*m*d) per patch). Codebook + commitment losses; EMA counts drive dead-code restarts."""

    def __init__(self, num_codes: int, dims: tuple[int, ...], dead_code_threshold: float = 1.0, decay: float = 0.99):
        super().__init__()
        self.num_codes, self.dims = num_codes, tuple(dims)
        self.dead_code_threshold, self.decay = dead_code_threshold, decay
        parts = [F.normalize(torch.randn(num_codes, d), dim=-1) for d in self.dims]  # unit parts, like z
        self.codebook = nn.Parameter(torch.cat(parts, dim=-1))
        self.register_buffer("cluster_size", torch.zeros(num_codes))

    def codes(self) -> Tensor:
        """The code vectors the search and lookup use, (num_codes, D)."""
        return self.codebook

    def distance(self, x: Tensor, codes: Tensor) -> Tensor:
        return squared_l2(x, codes)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, L, D) -> z_q (B, L, D), indices (B, L) in [0, num_codes)."""
        flat = z.to(self.codebook.dtype).reshape(-1, z.shape[-1])  # (N, D)
        codes = self.codes()
        idx = chunked_argmin(flat.detach(), codes.detach(), self.distance)
        q = codes[idx]
        counts = _counts(idx, self.num_codes, self.training)
        if self.training:
            self._update(counts, flat.detach())
        losses = {"codebook": F.mse_loss(q, flat.detach()), "commit": F.mse_loss(flat, q.detach())}
        stats = {"usage": self._alive().float().mean(), "batch_usage": (counts > 0).float().mean(),
                 "perplexity": perplexity(counts)}
        return QuantizerOutput(_straight_through(flat, q).view_as(z), idx.view(z.shape[:-1]), losses, stats)

    def lookup(self, indices: Tensor) -> Tensor:
        return self.codes()[indices]

    def _alive(self) -> Tensor:
        return self.cluster_size >= max(self.dead_code_threshold, 1e-12)

    @torch.no_grad()
    def _update(self, counts: Tensor, flat: Tensor) -> None:
        _ema_(self.cluster_size, counts, self.decay)
        dead = self.cluster_size < self.dead_code_threshold  # identical on every rank
        n = int(dead.sum())
        if n:
            self.codebook.data[dead] = _sample_rows(flat, n).to(self.codebook.dtype)
            self.cluster_size[dead] = self.dead_code_threshold
            _broadcast_(self.codebook.data, self.cluster_size)


class SharedIndexQuantizer(FlatQuantizer):
    """TokenFlow-style baseline: (num_codes, d_sem) and (num_codes, d_pix) codebooks share one index, chosen by
    argmin of w_sem * |z_sem - c_sem|^2 + w_pix * |z_pix - c_pix|^2 on l2-normalised parts."""

    def __init__(self, num_codes: int, dims: tuple[int, int], weights: tuple[float, float] = (1.0, 1.0),
                 dead_code_threshold: float = 1.0, decay: float = 0.99):
        super().__init__(num_codes, dims, dead_code_threshold, decay)
        self.weights = tuple(weights)

    def codes(self) -> Tensor:
        return torch.cat([F.normalize(p, dim=-1) for p in self.codebook.split(self.dims, dim=-1)], dim=-1)

    def distance(self, x: Tensor, codes: Tensor) -> Tensor:
        parts = zip(x.split(self.dims, -1), codes.split(self.dims, -1), self.weights, strict=True)
        return sum(w * squared_l2(xp, cp) for xp, cp, w in parts)
