"""Post-install fix-ups for the project's virtual environment; `make` runs it after every (re)install.

On a CPU-only torch, pip still installs PyPI's torchvision, which is a CUDA build: its compiled ops
(`torchvision/_C.so`) cannot load, and `import torchvision` then dies in `_meta_registrations.py`
with "operator torchvision::nms does not exist". transformers, timm, open_clip and lmms-eval all
import torchvision, so nothing works until that import does. We guard the fake-kernel registrations
so they are skipped when the compiled ops are absent (the transforms and models we use are pure Python).
On a CUDA torch the import already works and this script changes nothing.

Usage: python scripts/setup_env.py [--check]   (--check: report only, exit 1 if the import is broken)
"""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# semhitok-mllm: guard fake kernels when torchvision's compiled ops are missing"
GUARD = f'''
{MARKER}
def _register_fake_if_ops(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''
ANCHOR = "import torchvision.extension  # noqa: F401\n"


def torchvision_imports() -> tuple[bool, str]:
    """Import torchvision in a fresh interpreter; return (ok, last line of the error)."""
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 0, (lines[-1] if lines else "")


def patch_meta_registrations(path: Path) -> bool:
    """Guard every `torch.library.register_fake` in torchvision's `_meta_registrations.py`. Idempotent."""
    src = path.read_text()
    if MARKER in src:
        return False
    if ANCHOR not in src or "@torch.library.register_fake(" not in src:
        raise SystemExit(
            f"setup_env: {path} does not look as expected; cannot apply the CPU torchvision fix. "
            "Install a torchvision that matches your torch, or report this torchvision version."
        )
    src = src.replace(ANCHOR, ANCHOR + GUARD, 1)
    src = src.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
    path.write_text(src)
    return True


def fix_torchvision(check_only: bool) -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("setup_env: torchvision not installed; nothing to fix")
        return 0
    ok, err = torchvision_imports()
    if ok:
        print("setup_env: torchvision imports cleanly")
        return 0
    if "torchvision::" not in err or check_only:
        print(f"setup_env: `import torchvision` fails: {err}")
        return 1
    path = Path(spec.origin).parent / "_meta_registrations.py"
    patch_meta_registrations(path)
    ok, err = torchvision_imports()
    if not ok:
        print(f"setup_env: torchvision still fails to import after the CPU fix: {err}")
        return 1
    print(f"setup_env: patched {path} (CUDA torchvision build on CPU torch; compiled ops disabled)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report; do not patch")
    args = parser.parse_args()
    return fix_torchvision(args.check)


if __name__ == "__main__":
    sys.exit(main())
