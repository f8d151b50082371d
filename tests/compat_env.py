"""A side virtual environment with transformers 4.37.2, the version LLaVA-1.5 pins.

Why: exported folders must load strictly in the old transformers too (see DESIGN.md, the
`vision_model.` key trap), and that can only be checked by running the old library, which
cannot live in the main venv. Tests call `compat_python()` and run small scripts with it.

The venv is created on first use (CI starts from nothing) under an fcntl lock, so parallel
pytest workers wait for one creator instead of racing. A marker file written last tells a
complete venv from one whose creation was interrupted. pytest skips only when pip says a
pinned package cannot be found (an index without it); every other failure is a real error.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_LOCATION = Path(__file__).resolve().parent.parent / ".venv-tf437"
ENV_VAR = "CLOCMLLM_COMPAT_VENV"
STEPS: tuple[tuple[str, ...], ...] = (
    ("torch==2.13.0",),
    ("transformers==4.37.2", "safetensors", "numpy<2"),
)
_NOT_FOUND = ("No matching distribution found", "Could not find a version that satisfies")


def compat_location() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_LOCATION)


def _python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def _ready(venv: Path) -> bool:
    """True when the venv imports the pinned transformers (covers venvs made by hand)."""
    python = _python_of(venv)
    if not python.exists():
        return False
    if (venv / ".clocmllm-complete").exists():
        return True
    # package metadata only: importing torch + transformers would cost seconds per call
    script = (
        "from importlib.metadata import version as v; print(v('transformers'), v('torch'), v('safetensors'))"
    )
    probe = subprocess.run([str(python), "-c", script], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.split()[:1] == ["4.37.2"]


def _pip(python: Path, packages: tuple[str, ...]) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    if any(marker in output for marker in _NOT_FOUND):
        pytest.skip(f"compat venv: pip cannot find {' '.join(packages)}: {output.strip()[-400:]}")
    raise RuntimeError(f"compat venv: `{' '.join(cmd)}` failed (rc {proc.returncode}):\n{output[-4000:]}")


def create_compat_venv(venv: Path) -> None:
    """Build the venv from scratch into a temp folder, then rename it into place."""
    tmp = venv.with_name(venv.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
    for packages in STEPS:
        _pip(_python_of(tmp), packages)
    (tmp / ".clocmllm-complete").write_text("transformers==4.37.2\n")
    # A venv hard-codes its path in scripts, but `bin/python -m ...` works after a rename.
    shutil.rmtree(venv, ignore_errors=True)
    tmp.rename(venv)


def compat_python() -> str:
    """Path of the python of the transformers-4.37.2 venv, creating the venv if needed."""
    venv = compat_location()
    if _ready(venv):
        return str(_python_of(venv))
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.with_name(venv.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _ready(venv):  # another worker may have finished while we waited
                create_compat_venv(venv)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(_python_of(venv))


def run_compat(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a Python script in the compat venv; fail the test with its stderr on error."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [compat_python(), "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise AssertionError(f"compat script failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc
