"""The install stage's parts: a venv that sees the machine's own torch (never reinstalled), the
runtime packages installed offline from the carried wheel folder (pinned by requirements.txt),
and the check that torch is the same afterwards. ``--no-install`` checks an existing environment."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.gpucheck.common import OPTIONAL_PACKAGES, REQUIRED_IMPORTS, ROOT, RUNTIME_PACKAGES
from bench.gpucheck.environment import probe
from bench.gpucheck.runner import StageError
from bench.gpucheck.shell import Shell


def requirement_pins(requirements: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """name (lower case, '-' for '_') -> pinned version, from requirements.txt."""
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def install_requirements(names: list[str], pins: dict[str, str]) -> list[str]:
    """Requirement strings for ``names``: pinned where requirements.txt pins them. torch is never one."""
    out = []
    for name in names:
        key = name.lower().replace("_", "-")
        if key == "torch":
            raise ValueError("torch is the machine's own: never installed by the GPU check")
        out.append(f"{name}=={pins[key]}" if key in pins else name)
    return out


def pip_install_command(python: str, wheels: Path, requirements: list[str]) -> list[str]:
    """Offline install from the wheel folder only; what is already installed and fits is kept."""
    return [
        python,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        "--disable-pip-version-check",
        "--no-input",
        *requirements,
    ]


def make_venv(source_python: str, venv: Path, shell: Shell) -> None:
    """A venv seeing ``source_python``'s packages (its torch), its own site-packages first."""
    if not (venv / "bin" / "python").exists():
        try:
            shell.run([source_python, "-m", "venv", "--system-site-packages", str(venv)], "install")
        except StageError:  # no ensurepip on this Python: a venv without pip, the source's pip installs
            shutil.rmtree(venv, ignore_errors=True)
            shell.run(
                [source_python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], "install"
            )
    # When the source is itself a venv or conda env, --system-site-packages would show the *base*
    # interpreter's packages, not the ones torch was installed into: add those directories too.
    dirs = subprocess.run(
        [source_python, "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_memdlm_source_site.pth").write_text("\n".join(json.loads(dirs)) + "\n")


def missing_imports(python: str, modules: list[str]) -> list[str]:
    """``"<module>: <error>"`` for each of ``modules`` that ``python`` cannot import."""
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as exc:\n"
        "        print(f'MISSING {m}: {exc}')\n"
    )
    out = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT).stdout
    return [line[8:] for line in out.splitlines() if line.startswith("MISSING ")]


def check_existing(python: str) -> dict[str, Any]:
    """``--no-install``: the figures of an environment that must already have the packages."""
    info = probe(python, ["torch", *RUNTIME_PACKAGES, *OPTIONAL_PACKAGES])
    missing = missing_imports(python, REQUIRED_IMPORTS)
    if missing:
        raise StageError(f"--no-install: {python} lacks {', '.join(missing)}")
    return {"mode": "existing environment", "python": python, "packages": info["packages"]}


def _install_packages(pip: str, python: str, wheels: Path, shell: Shell) -> dict[str, str]:
    """Install the runtime packages (a failure is the stage's), then each optional one (a failure
    only turns its feature off); returns optional name -> what happened."""
    pins = requirement_pins()
    cmd = pip_install_command(pip, wheels, install_requirements(RUNTIME_PACKAGES, pins))
    if pip != python:
        cmd[3:3] = ["--python", python]  # pip >= 22.3 installs into another interpreter
    shell.run(cmd, "install")
    optional = {}
    for name in OPTIONAL_PACKAGES:
        try:
            shell.run(pip_install_command(pip, wheels, install_requirements([name], pins)), "install")
            optional[name] = "installed"
        except StageError as exc:
            optional[name] = f"not installed ({exc}): tracking off"
    return optional


def install_offline(source_python: str, venv: Path, wheels: Path, shell: Shell) -> dict[str, Any]:
    """Create ``venv`` over ``source_python`` (which has the machine's torch) and install the carried
    wheels into it; the stage's figures. StageError when torch is missing or was changed."""
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        raise StageError(
            f"no wheel folder at {wheels}: run `.venv/bin/python -m bench.gpu_check prepare` on a "
            "machine with the package registries and carry bench/gpu_check/ here"
        )
    before = probe(source_python, ["torch"])
    if "torch" not in before:
        raise StageError(f"{source_python} has no torch: the GPU check uses the machine's own torch")
    make_venv(source_python, venv, shell)
    python = str(venv / "bin" / "python")
    pip = python if (venv / "bin" / "pip").exists() else source_python
    optional = _install_packages(pip, python, wheels, shell)
    after = probe(python, ["torch", *RUNTIME_PACKAGES, *OPTIONAL_PACKAGES])
    untouched = (after.get("torch"), after.get("torch_file")) == (
        before.get("torch"),
        before.get("torch_file"),
    )
    figures = {
        "python": python,
        "source_python": source_python,
        "torch_before": before.get("torch"),
        "torch_after": after.get("torch"),
        "torch_file": after.get("torch_file"),
        "torch_untouched": untouched,
        "packages": after["packages"],
        "optional": optional,
    }
    if not untouched:
        err = StageError(f"torch changed: {before.get('torch')} -> {after.get('torch')}")
        err.figures = figures  # type: ignore[attr-defined]
        raise err
    return figures
