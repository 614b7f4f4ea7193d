"""Stage-1 ablation on the synthetic domain: which student stem and which distillation target keep object shape?

    python scripts/experiments/stage1_ablation.py prepare --out ~/runs/ablation            # renders + teacher cache
    python scripts/experiments/stage1_ablation.py train --out ~/runs/ablation NAME --stem inception --target whitened

`prepare` renders 10,000 training scenes (seed 0) and 3,000 probe scenes (seed 7) at 64 px and caches the demo
teacher's features (Inception-v3 `mixed_7` at 155 px, 8x8) once. `train` runs the demo's stage-1 semantic branch
(configs/demo/tokenizer-stage1.yaml's shapes: ViT 256 x 4, d_sem 32, K 512) on the cached features with one choice of
  --stem    patch (linear patch embedding) | conv (three stride-2 conv + GroupNorm + GELU, from scratch) |
            inception (`semantic.stem: inception`, the teacher's own stem)
  --target  raw (the paper's 1 - cos + L1) | channel (per-channel z-scored features, MSE) | whitened (top-64 principal
            components at unit variance, MSE) | shape-labels (BCE on the scene's shape presence: a supervised ceiling
            of what the student can learn in the budget)
  --no-quant  skip the VQ (the decoder reads the continuous student output)
AdamW 5e-4, 50 warm-up steps, cosine over --steps, batch 32, bf16 autocast, one thread. Every --every steps the code
probes (semhitok.attribute_probe, 2,400 train / 600 test probe scenes, 20 epochs) of the student and the quantized
codes go to OUT/NAME/log.jsonl. docs/tokenizer.md §5 has the table this produced.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mllm.synthetic.dataset import sample_dataset_scenes
from mllm.synthetic.probe_targets import probe_targets
from mllm.synthetic.render import render
from semhitok.attribute_probe import probe_scores
from semhitok.config import SemHiTokConfig
from semhitok.model import SemHiTok
from semhitok.runtime import scheduled_lr, to_tensor
from semhitok.train import load_run_config

REPO = Path(__file__).resolve().parents[2]


def demo_config(stem: str, target: str) -> SemHiTokConfig:
    model = load_run_config(REPO / "configs" / "demo" / "tokenizer-stage1.yaml").model
    semantic = {"stem": "inception" if stem == "inception" else "patch", "init_from_teacher": stem == "inception",
                "target": "whitened" if target == "whitened" else "raw"}  # fmt: skip
    return SemHiTokConfig.from_dict({**model.to_dict(), "semantic": {**model.to_dict()["semantic"], **semantic}})


def scratch_conv_stem(width: int) -> nn.Module:
    def unit(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]

    return nn.Sequential(*unit(3, 32), *unit(32, 64), *unit(64, 128), nn.Conv2d(128, width, 1))


def render_set(n: int, seed: int) -> tuple[torch.Tensor, list]:
    scenes, _, _ = sample_dataset_scenes(n, np.random.default_rng(seed))
    return torch.stack([to_tensor(render(s, 64)) for s in scenes]), scenes


@torch.no_grad()
def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = SemHiTok(demo_config("patch", "raw"), init_from_teacher=False).eval()
    for name, n, seed in (("train", 10_000, 0), ("probe", 3_000, 7)):
        images, scenes = render_set(n, seed)
        teacher = torch.cat([model.teacher_features(c).bfloat16() for c in images.split(128)])
        torch.save({"images": images, "teacher": teacher, "targets": probe_targets(scenes)}, out / f"{name}.pt")
        print(f"{name}: {n} scenes, teacher features {tuple(teacher.shape)}", flush=True)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    run = args.out / args.name
    run.mkdir(parents=True, exist_ok=True)
    data, probe = torch.load(args.out / "train.pt"), torch.load(args.out / "probe.pt")
    X, T = data["images"], data["teacher"].float()
    model = SemHiTok(demo_config(args.stem, args.target))
    if args.stem == "conv":
        model.semantic_encoder.patch_embed = scratch_conv_stem(model.config.semantic.width)
    mean, std = T.mean((0, 1)), T.std((0, 1))
    if args.target == "whitened":
        model.target_whitener.fit(T[::4].flatten(0, 1))
    head = nn.Linear(model.config.teacher.dim, probe["targets"]["shape"].shape[1]) if args.target == "shape-labels" else None
    parts = [model.semantic_encoder, model.semantic_head, model.semantic_decoder] + ([head] if head else [])
    params = [p for m in parts for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    n, g, start = len(probe["images"]), torch.Generator().manual_seed(0), time.time()
    train_idx, test_idx = torch.arange(int(0.8 * n)), torch.arange(int(0.8 * n), n)
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(step - 1, args.steps, args.lr, 50, "cosine")
        idx = torch.randint(len(X), (args.batch_size,), generator=g)
        x, t = X[idx], T[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.semantic_latent(x)
            q = model.semantic_quantizer(z) if args.quant else None
            recon = model.semantic_decoder(q.z_q if q else F.normalize(z.float(), dim=-1)).float()
        commit = q.losses["commit"] if q else torch.zeros(())
        if args.target == "raw":
            loss = 1 - F.cosine_similarity(recon, t, dim=-1).mean() + F.l1_loss(recon, t)
        elif args.target == "channel":
            loss = F.mse_loss(recon, (t - mean) / (std + 1e-6))
        elif args.target == "whitened":
            loss = F.mse_loss(recon, model.target_whitener(t))
        else:
            loss = F.binary_cross_entropy_with_logits(head(recon).amax(1), data["targets"]["shape"][idx].float())
        loss = loss + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {(time.time() - start) / step:.3f} s/step", flush=True)
        if step % args.every == 0 or step == args.steps:
            record = {"step": step, **probes(model, probe, train_idx, test_idx, args.quant)}
            print(json.dumps(record), flush=True)
            with open(run / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def probes(model: SemHiTok, probe: dict, train_idx: torch.Tensor, test_idx: torch.Tensor, quant: bool) -> dict:
    model.eval()
    latents = torch.cat([model.semantic_latent(c) for c in probe["images"].split(100)]).float()
    reps = {"student": latents, **({"codes": model.semantic_quantizer(latents).z_q.float()} if quant else {})}
    model.train()
    return {f"{name}/{task}": round(acc, 3) for name, x in reps.items()
            for task, acc in probe_scores(x, probe["targets"], train_idx, test_idx, epochs=20).items()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("name")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--stem", choices=("patch", "conv", "inception"), default="patch")
    t.add_argument("--target", choices=("raw", "channel", "whitened", "shape-labels"), default="raw")
    t.add_argument("--no-quant", dest="quant", action="store_false")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--every", type=int, default=200)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    prepare(args.out) if args.command == "prepare" else train(args)


if __name__ == "__main__":
    main()
