"""Packaging, import boundaries, the CPU torchvision fix and asset verification."""

import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from semhitok.runtime import AssetError, PackagedFile, packaged_file, verify_folder, write_manifest
from semhitok.runtime.assets import verify_file

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)


def test_import_packages_resolve_outside_the_repo_root():
    proc = run_python("import semhitok, mllm; print(semhitok.__file__); print(mllm.__file__)")
    assert proc.returncode == 0, proc.stderr
    sem_file, mllm_file = proc.stdout.split()
    assert Path(sem_file).parent == REPO / "tokenizer" / "semhitok"
    assert Path(mllm_file).parent == REPO / "mllm"


def test_semhitok_imports_neither_mllm_transformers_nor_deepspeed():
    code = (
        "import sys, semhitok, semhitok.runtime; "
        "import pkgutil, importlib; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(semhitok.__path__, 'semhitok.')]; "
        "bad = sorted(n for n in ('mllm', 'transformers', 'deepspeed') if n in sys.modules); "
        "print(','.join(bad))"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"semhitok pulled in: {proc.stdout.strip()}"


def test_import_semhitok_is_light():
    """Training, metrics and probes (and scipy, which the metrics need) load only when imported themselves."""
    heavy = ("scipy", "semhitok.train", "semhitok.metrics", "semhitok.probe", "semhitok.losses")
    proc = run_python(f"import sys, semhitok; print(','.join(m for m in {heavy!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"`import semhitok` loaded: {proc.stdout.strip()}"


def _semhitok_imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every (semhitok module, imported names) that a file imports directly (names empty for `import semhitok.x`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "semhitok":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "semhitok"]
    return found


def test_mllm_uses_semhitok_only_through_its_exports():
    """The tokenizer through `semhitok`'s names, the infrastructure through `semhitok.runtime`'s (DESIGN §2)."""
    import semhitok
    import semhitok.runtime

    exports = {"semhitok": set(semhitok.__all__), "semhitok.runtime": set(semhitok.runtime.__all__)}
    offenders = {
        f"{p.relative_to(REPO)}: {module}": sorted(set(names) - exports.get(module, set())) or "module"
        for p in (REPO / "mllm").rglob("*.py")
        for module, names in _semhitok_imports(p)
        if module not in exports or not names or not set(names) <= exports[module]
    }
    assert not offenders, f"mllm must import the exports of `semhitok` / `semhitok.runtime` only: {offenders}"


def test_semhitok_runtime_never_imports_the_tokenizer():
    """`semhitok.runtime` is the lower layer: none of its files imports the rest of `semhitok`."""
    runtime = REPO / "tokenizer" / "semhitok" / "runtime"
    offenders = {
        str(p.relative_to(REPO)): module
        for p in runtime.rglob("*.py")
        for module, _ in _semhitok_imports(p)
        if module != "semhitok.runtime" and not module.startswith("semhitok.runtime.")
    }
    assert not offenders, f"semhitok.runtime imports upward: {offenders}"


def test_no_import_package_named_tokenizer_or_eval():
    for name in ("tokenizer", "eval"):
        assert not (REPO / name / "__init__.py").exists(), f"{name}/ must not be an import package"
    proc = run_python("import importlib.util as u; print(u.find_spec('tokenizer'))")
    assert proc.stdout.strip() == "None"


def test_torchvision_imports_and_transformers_sees_it():
    proc = run_python("import torchvision, torchvision.transforms, transformers; from transformers import LlamaConfig")
    assert proc.returncode == 0, proc.stderr


def _setup_env_module():
    spec = importlib.util.spec_from_file_location("setup_env", REPO / "scripts" / "setup_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchvision_patch_is_idempotent_and_refuses_unknown_files(tmp_path):
    setup_env = _setup_env_module()
    target = tmp_path / "_meta_registrations.py"
    original = (
        "import torch\nimport torchvision.extension  # noqa: F401\n\n"
        '@torch.library.register_fake("torchvision::nms")\ndef meta_nms(d, s, t):\n    return d\n'
    )
    target.write_text(original)
    assert setup_env.patch_meta_registrations(target) is True
    patched = target.read_text()
    assert "@_register_fake_if_ops(" in patched and "@torch.library.register_fake(" not in patched
    assert setup_env.patch_meta_registrations(target) is False
    assert target.read_text() == patched
    target.write_text("something else entirely\n")
    with pytest.raises(SystemExit, match="does not look as expected"):
        setup_env.patch_meta_registrations(target)


def test_missing_package_names_the_fix():
    ghost = PackagedFile("no-such-pkg", "1.0", "no_such_pkg_xyz", "w.pt", "0" * 64, "ghost weights")
    with pytest.raises(AssetError, match=r"not installed.*make assets"):
        packaged_file(ghost)


def test_corrupt_file_names_the_fix(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"real bytes")
    good = hashlib.sha256(b"real bytes").hexdigest()
    assert verify_file(path, good, "weights", "run `make assets`") == path
    path.write_bytes(b"flipped bytes")
    with pytest.raises(AssetError, match=r"corrupt.*make assets"):
        verify_file(path, good, "weights", "run `make assets`")
    with pytest.raises(AssetError, match=r"not found.*make assets"):
        verify_file(tmp_path / "absent", good, "weights", "run `make assets`")


def test_converted_folder_manifest_detects_tampering(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path, {"package": "test"})
    assert json.loads((tmp_path / "manifest.json").read_text())["files"].keys() == {"config.json", "model.safetensors"}
    assert verify_folder(tmp_path, "model", "fix it") == tmp_path
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(AssetError, match="model file model.safetensors.*corrupt"):
        verify_folder(tmp_path, "model", "fix it")
    with pytest.raises(AssetError, match="not found"):
        verify_folder(tmp_path / "nothing", "model", "fix it")


def test_smollm2_missing_from_cache_names_the_fix(tmp_path, monkeypatch):
    from mllm.assets import smollm2_path

    monkeypatch.setenv("SEMHITOK_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match=r"make assets"):
        smollm2_path()


def test_real_assets_are_installed_and_verified():
    from mllm.assets import SMOLLM2_GGUF, smollm2_path
    from semhitok.runtime import inception_path

    assert inception_path().name == "default_1.pt"
    assert packaged_file(SMOLLM2_GGUF).suffix == ".gguf"
    assert (smollm2_path() / "config.json").is_file()
