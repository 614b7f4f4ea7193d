"""Precision (DESIGN §8): `auto` picks bf16 autocast exactly where the device computes bf16 natively, and a bf16 step
of each trainer matches fp32 within a stated tolerance."""

import pytest
import torch

from semhitok.runtime.precision import cpu_has_bf16, resolve_precision

CPU = torch.device("cpu")


def test_cpu_flags_decide_native_bf16(tmp_path):
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    arm = tmp_path / "c"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_has_bf16(str(with_bf16)) and cpu_has_bf16(str(arm)) and not cpu_has_bf16(str(without))
    assert not cpu_has_bf16(str(tmp_path / "missing"))


def test_auto_follows_the_device_and_explicit_settings_are_kept(monkeypatch):
    import semhitok.runtime.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", CPU).bf16 and "natively" in resolve_precision("auto", CPU).describe()
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert not resolve_precision("auto", CPU).bf16
    assert resolve_precision("bf16", CPU).bf16 and "slow" in resolve_precision("bf16", CPU).reason
    assert not resolve_precision("fp32", CPU).bf16
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16", CPU)


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    with resolve_precision("bf16", CPU).autocast(CPU):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with resolve_precision("fp32", CPU).autocast(CPU):
        assert layer(x).dtype == torch.float32
