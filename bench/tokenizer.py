"""Tokenizer benchmarks, measured side by side in one run (never asserted in tests).

    python bench/tokenizer.py [--batch-size 2 --iters 2 --precisions fp32,bf16 --lookup-batch 8 --lookup-iters 3
                              --device cpu --threads N --json PATH]

(a) encode / decode throughput (images/s) at 256 px, in fp32 and in bf16 (autocast, as training and `precision:
    bf16` run it), of
    - the "semhitok-paper-256" preset with random weights. Its teacher is SigLIP-L/16-256 via open_clip; the weights
      are not available here, so the same open_clip architecture is built with random weights (it only seeds the
      student: encode/decode never run the teacher);
    - LlamaGen's VQ-16 tokenizer shape with random weights, built from the same library's VQGAN CNN modules (encoder
      and decoder ch 128, ch_mult 1,1,2,2,4, 2 res blocks, z 256; 16384 l2-normalised codes of dim 8; 16x16 tokens):
      the tokenizer LlamaGen's GPT models generate for. Ratio = SemHiTok's images/s over LlamaGen's, at the same
      precision, and each as its pipeline runs it: ours in bf16 (`precision: auto` on a bf16 device) vs LlamaGen's
      VQ model in fp32 (as its sample scripts load it), like bench/generate.py's LlamaGen baseline.
(b) the stage-2 code search, hierarchical vs flat over the same K*m vocabulary, with the library's quantizer classes
    in eval mode on the same latents (a batch of 16x16 grids):
    - "texture": `SubCodebookQuantizer` (given the semantic indices, nearest of the m codes of row i) vs
      `FlatQuantizer` over all K*m texture vectors (d_pix): the O(m*d) vs O(K*m*d) claim in isolation;
    - "stage-2": `HierarchicalQuantizer` (semantic cosine search over K, then the m codes) vs `FlatQuantizer` over
      K*m joint (d_sem + d_pix) vectors: the whole search a flat VQ of the same vocabulary would do.
Times are the fastest of `iters` interleaved calls. On a CPU shared with other jobs, use `--threads 1`: with more
threads than free cores every small op waits for a time slice and the millisecond-scale searches read 10-100x slow.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from timing import best_seconds
from torch import Tensor, nn

from semhitok.config import PRESETS, TeacherConfig
from semhitok.model import SemHiTok
from semhitok.modules import Decoder, Encoder
from semhitok.quantizers import EMAQuantizer, FlatQuantizer, HierarchicalQuantizer, SubCodebookQuantizer
from semhitok.runtime import resolve_precision
from semhitok.teachers import OpenCLIPTeacher, Teacher

PRESET = "semhitok-paper-256"


class RandomOpenCLIPTeacher(OpenCLIPTeacher):
    """`OpenCLIPTeacher` of the same open_clip architecture (`cfg.name`) with random weights."""

    def __init__(self, cfg: TeacherConfig, grid: int):
        Teacher.__init__(self, cfg, grid)
        self.visual = open_clip.create_model(cfg.name, pretrained=None).visual
        self._freeze()


class LlamaGenVQ16(nn.Module):
    """LlamaGen's VQ-16 tokenizer shape, random weights: encode = CNN encoder -> 1x1 conv to 8 -> cosine-nearest of
    16384 codes, images (B, 3, 256, 256) -> codes (B, 16, 16); decode = code vectors -> 1x1 conv to 256 -> CNN decoder."""

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), z: int = 256, codes: int = 16384,
                 dim: int = 8):  # fmt: skip
        super().__init__()
        self.encoder, self.quant_conv = Encoder(ch, ch_mult, 2, z), nn.Conv2d(z, dim, 1)
        self.codebook = nn.Parameter(F.normalize(torch.randn(codes, dim), dim=-1))
        self.post_quant_conv, self.decoder = nn.Conv2d(dim, z, 1), Decoder(ch, ch_mult, 2, z)

    def encode(self, images: Tensor) -> Tensor:
        z = F.normalize(self.quant_conv(self.encoder(images)), dim=1)  # (B, dim, h, w)
        return torch.einsum("bdhw,kd->bhwk", z, self.codebook).argmax(-1)  # (B, h, w)

    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(self.codebook[codes].permute(0, 3, 1, 2)))


def bench_codec(batch: int, precisions: list[str], iters: int, device: torch.device) -> dict[str, float]:
    """Images/s of encode and decode of the paper preset and of LlamaGen's VQ-16 (random weights) per precision,
    on a batch of 256 px images, all calls interleaved."""
    cfg = PRESETS[PRESET]
    torch.manual_seed(0)
    models = {"semhitok": SemHiTok(cfg, teacher=RandomOpenCLIPTeacher(cfg.teacher, cfg.grid)), "llamagen": LlamaGenVQ16()}
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    fns = {}
    for name, model in models.items():
        model.to(device).eval()
        for precision in precisions:
            autocast = resolve_precision(precision, device).autocast(device)
            with torch.inference_mode(), autocast:
                codes = model.encode(images)
            fns[name, precision, "encode"] = timed_call(autocast, model.encode, images)
            fns[name, precision, "decode"] = timed_call(autocast, model.decode, codes)
    with torch.inference_mode():
        sec = best_seconds(fns, iters, device)
    out = {f"{name}_{precision}_{op}_img_per_s": batch / t for (name, precision, op), t in sec.items()}
    params = {f"{name}_params_M": sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    return {"batch": batch, **params, **out}


def timed_call(autocast, fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    """fn(x) under `autocast` (a precision's context), as a call for `best_seconds`."""

    def call() -> Tensor:
        with autocast:
            return fn(x)

    return call


def bench_lookup(K: int, m: int, d_sem: int, d_pix: int, L: int, batch: int, iters: int,
                 device: torch.device) -> dict[str, float]:
    """Milliseconds per search call of both comparisons of (b) and the flat / hierarchical ratios."""
    torch.manual_seed(0)
    z = F.normalize(torch.randn(batch, L, d_sem + d_pix, device=device), dim=-1)
    z_sem, z_pix = z.split((d_sem, d_pix), dim=-1)
    semantic_indices = torch.randint(K, (batch, L), device=device)
    texture = SubCodebookQuantizer(K, m, d_pix).to(device).eval()
    hier = HierarchicalQuantizer(EMAQuantizer(K, d_sem, init="random"), texture).to(device).eval()
    flat_tex = FlatQuantizer(K * m, (d_pix,)).to(device).eval()
    flat_joint = FlatQuantizer(K * m, (d_sem, d_pix)).to(device).eval()
    runs = {
        "texture_hier": lambda: texture(z_pix, semantic_indices),
        "texture_flat": lambda: flat_tex(z_pix),
        "stage2_hier": lambda: hier(z),
        "stage2_flat": lambda: flat_joint(z),
    }
    with torch.inference_mode():
        out = {f"{name}_ms": 1e3 * t for name, t in best_seconds(runs, iters, device).items()}
    return {**out, "texture_ratio": out["texture_flat_ms"] / out["texture_hier_ms"],
            "stage2_ratio": out["stage2_flat_ms"] / out["stage2_hier_ms"],
            "texture_ops_ratio": K, "stage2_ops_ratio": K * m * (d_sem + d_pix) / (K * d_sem + m * d_pix)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=2, help="images per encode/decode call")
    p.add_argument("--iters", type=int, default=2, help="timed encode/decode calls (after one warm-up)")
    p.add_argument("--precisions", default="fp32,bf16", help="encode/decode precisions (bf16: autocast)")
    p.add_argument("--lookup-batch", type=int, default=8, help="16x16 grids per search call")
    p.add_argument("--lookup-iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cfg = torch.device(args.device), PRESETS[PRESET]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name})")
    if "bf16" in args.precisions.split(",") and not resolve_precision("auto", device).bf16:
        print("note: this device has no native bf16: the bf16 rows are emulated (slow), and the #15 target (ours as "
              "its pipeline runs it, bf16 on an avx512_bf16 CPU) does not apply to them")  # fmt: skip
    codec = bench_codec(args.batch_size, args.precisions.split(","), args.iters, device)
    lookup = bench_lookup(cfg.K, cfg.m, cfg.semantic.d_sem, cfg.pixel.d_pix, cfg.grid**2, args.lookup_batch,
                          args.lookup_iters, device)
    print(f"\n(a) encode / decode at {cfg.image_size}px, batch {codec['batch']}, random weights: {PRESET} "
          f"{codec['semhitok_params_M']:.0f}M params vs LlamaGen VQ-16 {codec['llamagen_params_M']:.0f}M")  # fmt: skip
    print(f"  {'precision':<10}{'op':<8}{'SemHiTok img/s':>16}{'LlamaGen img/s':>16}{'ratio':>8}")
    for precision in args.precisions.split(","):
        for op in ("encode", "decode"):
            ours, theirs = (codec[f"{n}_{precision}_{op}_img_per_s"] for n in ("semhitok", "llamagen"))
            print(f"  {precision:<10}{op:<8}{ours:>16.2f}{theirs:>16.2f}{ours / theirs:>7.2f}x")
    if {"fp32", "bf16"} <= set(args.precisions.split(",")):
        ratios = {op: codec[f"semhitok_bf16_{op}_img_per_s"] / codec[f"llamagen_fp32_{op}_img_per_s"]
                  for op in ("encode", "decode")}  # fmt: skip
        codec |= {f"pipeline_{op}_ratio": r for op, r in ratios.items()}
        print(f"  each as its pipeline runs it (ours bf16 under precision: auto; LlamaGen's sample scripts run the VQ "
              f"model in fp32): encode {ratios['encode']:.2f}x, decode {ratios['decode']:.2f}x")
    print(f"\n(b) code search, K={cfg.K} m={cfg.m} d_sem={cfg.semantic.d_sem} d_pix={cfg.pixel.d_pix}, "
          f"{args.lookup_batch}x{cfg.grid}x{cfg.grid} patches")
    print(f"  {'search':<9}{'hierarchical ms':>17}{'flat ms':>11}{'flat/hier':>11}{'op ratio':>10}")
    for name in ("texture", "stage2"):
        print(f"  {name:<9}{lookup[f'{name}_hier_ms']:>17.3f}{lookup[f'{name}_flat_ms']:>11.2f}"
              f"{lookup[f'{name}_ratio']:>10.0f}x{lookup[f'{name}_ops_ratio']:>9.0f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "preset": PRESET,
                                         "codec": codec, "lookup": lookup}, indent=2))


if __name__ == "__main__":
    main()
