"""``python -m bench.gpu_check prepare``, run here (with the package registries) before the check:
CPython 3.12 wheels of the runtime packages' closure (torch left out: the GPU machine has its own),
a pure-Python DeepSpeed wheel, and a slice of the sample corpus, all under ``bench/gpu_check/``
for the device copy to carry."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpucheck.common import OPTIONAL_PACKAGES, ROOT, RUNTIME_PACKAGES

PY312_TAGS = [
    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64", "--platform", "any",
]  # fmt: skip


def dependency_closure(roots: list[str], python_version: str = "3.12") -> dict[str, str]:
    """name -> installed version of ``roots`` and everything they need (markers evaluated for
    ``python_version``), read from this environment; torch and what only torch needs are left out."""
    # Imported here: `packaging` is this venv's, and the rest of the check runs on a bare Python.
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    seen: dict[str, str] = {}
    stack = [canonicalize_name(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in seen or name == "torch":
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as exc:
            raise SystemExit(f"{name} is not installed here: `make venv` first") from exc
        seen[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                stack.append(canonicalize_name(req.name))
    return seen


def download_wheels(wheels: Path, with_mlflow: bool) -> None:
    """Fill ``wheels`` with the py3.12 wheels of the runtime closure at this venv's versions, and a
    DeepSpeed wheel built without its ops (``with_mlflow``: mlflow and its closure too)."""
    wheels.mkdir(parents=True, exist_ok=True)
    roots = RUNTIME_PACKAGES + (OPTIONAL_PACKAGES if with_mlflow else [])
    closure = dependency_closure(roots)
    binary = [f"{n}=={v}" for n, v in sorted(closure.items()) if n != "deepspeed"]
    pip = [sys.executable, "-m", "pip"]
    print(f"downloading {len(binary)} CPython 3.12 wheels into {wheels}", flush=True)
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *PY312_TAGS, "-d", str(wheels), *binary],
                   check=True)  # fmt: skip
    # DeepSpeed ships an sdist only; with DS_BUILD_OPS=0 it builds a pure-Python wheel (ops JIT-built
    # at run time if ever needed); --no-build-isolation: its setup.py imports this venv's torch.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    f"deepspeed=={closure['deepspeed']}"], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))  # fmt: skip
    size = sum(f.stat().st_size for f in wheels.glob("*.whl"))
    print(f"{wheels}: {len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB")


def write_corpus(path: Path, max_bytes: int) -> None:
    """A deterministic slice of the sample corpus (every source represented) as .jsonl.gz."""
    sys.path.insert(0, str(ROOT))
    # Imported here: the sample corpus needs this venv's packages, the rest of the check does not.
    from data_prep.sample_corpus import sample_documents

    docs = [json.loads(line) for line in sample_documents().read_text().splitlines() if line.strip()]
    total = sum(len(d["text"].encode()) for d in docs)
    stride = max(1, round(total / max_bytes))
    picked, size = [], 0
    for d in docs[::stride]:
        if size >= max_bytes:
            break
        picked.append({"text": d["text"], "source": d.get("source", "")})
        size += len(d["text"].encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for d in picked:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
    print(
        f"{path}: {len(picked)} documents, {size / 2**20:.1f} MiB of text, {path.stat().st_size / 2**20:.1f} MiB gzipped"
    )
