"""The GPU check: the CUDA path end to end on one bare GPU machine, in one timed script.

    bash bench/gpu_check.sh                      # = python3 -m bench.gpu_check run
    python -m bench.gpu_check run [--budget-s 330] [--preset 125m] [--steps 30] [--bench-presets 125m,1b]
    .venv/bin/python -m bench.gpu_check prepare  # here, with network: wheels + corpus to carry there

``run`` goes through stages, each timed, each recorded as ``pass``, ``fail`` (with the error and
the tail of its log) or ``skipped: ...``, and writes ``bench/results/gpu_check.json``:

1. ``install``: a venv that sees the machine's own torch (never reinstalled), the runtime
   packages installed from the carried wheel folder with ``pip --no-index`` and ``DS_BUILD_OPS=0``;
   records that torch's version and location are unchanged. ``--no-install`` checks an existing
   environment instead.
2. ``environment``: GPU name, driver, torch / CUDA / NCCL / DeepSpeed / megatron-core versions;
   with ``--device-check cuda`` (default) it fails when CUDA is not usable.
3. ``data``: ``make data`` on the carried corpus (tokenizer + shards, on this machine's cores).
4. ``pretrain``: ``make pretrain CLUSTER=local`` (submitit LocalExecutor, 1 task, NCCL) of the
   ``--preset`` model (125m: 134M parameters) for ``--steps`` steps with evals, checkpoints and an
   export: the uninterrupted reference.
5. ``resume``: the same command again in another run directory, killed (SIGKILL of the launcher and
   its task) once its first checkpoint is published, then started again: it resumes from that
   checkpoint, finishes and exports. Its losses (train and eval) must match the reference's at
   every step within ``--resume-rtol`` (relative).
6. ``sample``: ``make sample`` on the resumed run's export, memory off and adapted.
7. ``eval``: ``make eval`` (a small config: 3 tasks x 8 examples, exposure bias) on that export.
8. ``bench_step_<preset>``: ``make bench-step`` per ``--bench-presets`` preset: MFU against the
   trainer's peak (the table's dense bf16 peak on known GPUs), MemDLM/MDLM step and FLOP ratios.

A global time budget (``--budget-s``) bounds the whole run: a stage starts only if its minimum
time still fits (else ``skipped: time budget``), and its commands are killed when the budget runs
out. This module uses the standard library only: it runs on the bare machine's Python before any
package is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "bench" / "gpu_check"
DEFAULT_WHEELS = HERE / "wheels"
DEFAULT_CORPUS = HERE / "corpus.jsonl.gz"
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
# What the bare GPU machine lacks (its torch stays); pins come from requirements.txt.
RUNTIME_PACKAGES = [
    "deepspeed",
    "megatron-core",
    "webdataset",
    "sentencepiece",
    "submitit",
    "safetensors",
    "numpy",
    "pyyaml",
    "tqdm",
    "matplotlib",  # loss-curve and exposure-bias plots (not pinned: mlflow's dependency on the CPU)
]
OPTIONAL_PACKAGES = ["mlflow"]  # tracking: ~160 MB of wheels with its closure; off when absent
REQUIRED_IMPORTS = ["deepspeed", "megatron.core", "webdataset", "sentencepiece", "submitit", "safetensors"]
SCHEMA = 1


# --------------------------------------------------------------------------- stage runner
class StageError(RuntimeError):
    """A stage's failure: a one-line reason and the tail of what its command printed."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


@dataclass
class Stage:
    name: str
    fn: Callable[[], dict[str, Any]]  # returns the stage's figures; raises on failure
    min_s: float = 0.0  # least time it needs: not started when less of the budget is left
    requires: tuple[str, ...] = ()  # stages that must have passed (when they were run)


@dataclass
class Budget:
    """The global time budget; ``clock`` is injectable for tests."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


def run_stages(
    stages: list[Stage], budget: Budget, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run ``stages`` in order; one record per stage, whatever happens to the others."""
    records: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    for st in stages:
        rec: dict[str, Any] = {"name": st.name, "status": "", "seconds": 0.0, "figures": {}}
        unmet = [r for r in st.requires if r in status and status[r] != "pass"]
        if unmet:
            rec["status"] = f"skipped: needs {', '.join(unmet)}"
        elif budget.remaining() < st.min_s:
            rec["status"] = "skipped: time budget"
            rec["error"] = (
                f"{budget.remaining():.0f} s left of {budget.seconds:.0f}, stage needs >= {st.min_s:.0f} s"
            )
        else:
            t0 = budget.clock()
            try:
                rec["figures"] = st.fn() or {}
                rec["status"] = "pass"
            except StageError as exc:
                rec["status"] = "fail"
                rec["error"] = str(exc)
                rec["error_tail"] = exc.tail[-3000:]
                rec["figures"] = getattr(exc, "figures", {}) or {}
            except Exception as exc:  # a bug or an unexpected state: recorded, the next stage runs
                rec["status"] = "fail"
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["error_tail"] = traceback.format_exc()[-3000:]
            rec["seconds"] = round(budget.clock() - t0, 2)
        status[st.name] = rec["status"]
        records.append(rec)
        log(
            f"[gpu-check] {st.name}: {rec['status']} ({rec['seconds']:.1f} s)"
            + (f" -- {rec['error']}" if rec.get("error") else "")
        )
    return records


def build_report(
    records: list[dict[str, Any]], budget: Budget, started: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """The JSON document: environment headline, every stage, the figures by stage, overall ok."""
    by_name = {r["name"]: r for r in records}
    env = by_name.get("environment", {}).get("figures", {})
    return {
        "schema": SCHEMA,
        "started": started,
        "finished": _now(),
        "elapsed_s": round(budget.elapsed(), 2),
        "budget_s": budget.seconds,
        "ok": bool(records) and all(r["status"] == "pass" for r in records),
        "gpu": env.get("gpu"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda_runtime"),
        "environment": env,
        "settings": settings,
        "stages": [{k: v for k, v in r.items() if k != "figures"} for r in records],
        "figures": {r["name"]: r["figures"] for r in records},
    }


def write_report(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- processes
def _live_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            parents[int(entry.parent.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> set[int]:
    """``root`` and every live descendant (listed before anything is killed: orphans lose ancestry)."""
    parents = _live_parents()
    tree = {root} & parents.keys()
    while found := {pid for pid, ppid in parents.items() if ppid in tree} - tree:
        tree |= found
    return tree


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, its process group and all its descendants (submitit's tasks included)."""
    tree = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: group id == pid
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-chars:].decode(errors="replace")


class Shell:
    """Runs a stage's commands: output appended to ``logs/<stage>.log``, killed at the budget's end."""

    def __init__(self, budget: Budget, logs: Path, env: dict[str, str] | None = None):
        self.budget = budget
        self.logs = logs
        self.env = env or dict(os.environ)
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        path = self.logs / f"{log}.log"
        with open(path, "ab") as f:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
            f.flush()
            return subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def run(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> str:
        """Run to completion within the budget; returns the log's tail; StageError otherwise."""
        path = self.logs / f"{log}.log"
        timeout = max(1.0, self.budget.remaining())
        proc = self.start(cmd, log, env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise StageError(
                f"killed at the time budget after {timeout:.0f} s: {' '.join(cmd)}", tail(path)
            ) from None
        except BaseException:
            kill_tree(proc)
            raise
        if rc != 0:
            raise StageError(f"exit status {rc}: {' '.join(cmd)}", tail(path))
        return tail(path)


# --------------------------------------------------------------------------- comparisons
def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resume_parity(
    reference: list[dict[str, Any]], resumed: list[dict[str, Any]], rtol: float, after_step: int = 0
) -> dict[str, Any]:
    """Compare the resumed run's losses (train ``loss`` and every ``eval/*``) with the reference's,
    step by step; ``ok`` when every step the reference logged after ``after_step`` is there and
    every value is within ``rtol`` (relative)."""
    ref = {r["step"]: r for r in reference if "step" in r}
    res = {r["step"]: r for r in resumed if "step" in r}
    wanted = [s for s in sorted(ref) if s > after_step]
    missing = [s for s in wanted if s not in res]
    worst: dict[str, Any] = {"rel": 0.0, "abs": 0.0, "step": None, "key": None}
    compared = 0
    for s in wanted:
        if s not in res:
            continue
        for key, a in ref[s].items():
            if not (key == "loss" or key.startswith("eval/")) or not isinstance(a, (int, float)):
                continue
            b = res[s].get(key)
            if not isinstance(b, (int, float)):
                missing.append(s)
                continue
            compared += 1
            diff = abs(a - b)
            rel = diff / max(abs(a), 1e-12)
            if rel > worst["rel"] or worst["step"] is None:
                worst = {"rel": rel, "abs": diff, "step": s, "key": key, "reference": a, "resumed": b}
    ok = compared > 0 and not missing and worst["rel"] <= rtol
    return {
        "ok": ok,
        "rtol": rtol,
        "compared_values": compared,
        "steps_compared": [s for s in wanted if s in res],
        "missing_steps": sorted(set(missing)),
        "exact": compared > 0 and worst["abs"] == 0.0,
        "max_rel_diff": worst["rel"],
        "max_abs_diff": worst["abs"],
        "worst": worst,
    }


def approx_params(model: dict[str, Any]) -> int | None:
    """Weights of the DLM from its resolved config: blocks (attention 4d², SwiGLU 3df) + untied
    embedding and head over the vocabulary padded to 128 (norms left out: < 0.1%)."""
    try:
        d, f, n, v = model["d_model"], model["ffn_hidden"], model["n_layers"], model["vocab_size"]
    except (KeyError, TypeError):
        return None
    return n * (4 * d * d + 3 * d * f) + 2 * (-(-v // 128) * 128) * d


def trim(value: Any, max_list: int = 20, depth: int = 0) -> Any:
    """A JSON value with long lists cut (first items + count), for summaries of big result files."""
    if depth > 8:
        return "..."
    if isinstance(value, dict):
        return {k: trim(v, max_list, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > max_list:
            return [trim(v, max_list, depth + 1) for v in value[:4]] + [f"... {len(value)} items"]
        return [trim(v, max_list, depth + 1) for v in value]
    return value


# --------------------------------------------------------------------------- environment
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


PROBE = r"""
import importlib.metadata as md, json, platform, subprocess, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    out.update(torch=torch.__version__, torch_file=torch.__file__, cuda_runtime=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
        try:
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as exc:
            out["nccl"] = f"unavailable: {exc}"
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            out["driver"] = None
except ImportError as exc:
    out["torch_error"] = str(exc)
pk = {}
for n in sys.argv[1:]:
    try:
        pk[n] = md.version(n)
    except md.PackageNotFoundError:
        pk[n] = None
out["packages"] = pk
print("PROBE " + json.dumps(out))
"""


def probe(python: str, packages: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [python, "-c", PROBE, *packages], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    raise StageError(
        f"{python}: probe failed (exit {proc.returncode})", proc.stdout[-1500:] + proc.stderr[-1500:]
    )


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


# --------------------------------------------------------------------------- the check
class GpuCheck:
    def __init__(self, args: argparse.Namespace, budget: Budget):
        self.a = args
        self.budget = budget
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DS_BUILD_OPS="0", PYTHONUNBUFFERED="1")
        env.pop("DS_ACCELERATOR", None)  # training sets it from the device
        self.shell = Shell(budget, self.work / "logs", env)
        self.venv = Path(args.venv).resolve() if args.venv else self.work / "venv"
        self.python = str(self.venv / "bin" / "python")
        self.stamp = self.work / ".deps-ready"  # make's STAMP: the environment is ready, install nothing
        self.tracking = False
        self.export: Path | None = None
        self.reference_metrics: list[dict[str, Any]] = []

    # ---- helpers
    def make(self, target: str, *variables: str, log: str) -> str:
        return self.shell.run(
            ["make", "--no-print-directory", f"VENV={self.venv}", f"STAMP={self.stamp}", target, *variables],
            log,
        )

    def write_json_yaml(self, name: str, data: dict[str, Any]) -> Path:
        path = self.work / name  # JSON is YAML: the config loaders read it as it is
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def data_config(self) -> Path:
        return self.write_json_yaml(
            "data.yaml",
            {
                "out_dir": str(self.work / "data"),
                "corpus": [str(Path(self.a.corpus).resolve())],
                "seq_len": self.a.seq_len,
                "val_fraction": 0.05,
                "train_shards": 8,
                "val_shards": 2,
                "seed": 1234,
                "tokenizer": {"vocab_size": self.a.vocab, "model_type": "bpe"},
            },
        )

    def train_config(self) -> Path:
        every = max(1, self.a.steps // 3)
        return self.write_json_yaml(
            "train.yaml",
            {
                "run_dir": str(self.work / "reference"),
                "seed": 0,
                "steps": self.a.steps,
                "log_every": 1,
                "model_preset": self.a.preset,
                "model": {"seq_len": self.a.seq_len},
                "data": {"path": str(self.work / "data"), "batch_size": self.a.batch, "num_workers": 1},
                "memory": {"enabled": True},
                "optim": {"lr": 1.0e-3, "warmup_steps": max(1, self.a.steps // 6)},
                "parallel": {"tp": 1, "zero_stage": 3, "precision": "auto"},
                "checkpoint": {"every": every, "keep": 3},
                "eval": {"every": every, "batches": 2},
                "tracking": {"enabled": self.tracking, "root": str(self.work / "mlflow")},
            },
        )

    def pretrain(self, run_dir: Path, log: str) -> list[str]:
        return [
            "make",
            "--no-print-directory",
            f"VENV={self.venv}",
            f"STAMP={self.stamp}",
            "pretrain",
            "CLUSTER=local",
            f"CONFIG={self.work / 'train.yaml'}",
            f"ARGS=--data-config {self.work / 'data.yaml'} run_dir={run_dir}",
        ]

    # ---- stages
    def stage_install(self) -> dict[str, Any]:
        if self.a.no_install:
            info = probe(self.python, ["torch", *RUNTIME_PACKAGES, *OPTIONAL_PACKAGES])
            missing = self._missing_imports(REQUIRED_IMPORTS)
            if missing:
                raise StageError(f"--no-install: {self.python} lacks {', '.join(missing)}")
            self.tracking = bool(info["packages"].get("mlflow"))
            self.stamp.touch()
            return {"mode": "existing environment", "python": self.python, "packages": info["packages"]}
        wheels = Path(self.a.wheels).resolve()
        if not wheels.is_dir() or not any(wheels.glob("*.whl")):
            raise StageError(
                f"no wheel folder at {wheels}: run `.venv/bin/python -m bench.gpu_check prepare` on a "
                "machine with the package registries and carry bench/gpu_check/ here"
            )
        before = probe(self.a.python, ["torch"])
        if "torch" not in before:
            raise StageError(f"{self.a.python} has no torch: the GPU check uses the machine's own torch")
        make_venv(self.a.python, self.venv, self.shell)
        pip = self.python if (self.venv / "bin" / "pip").exists() else self.a.python
        pins = requirement_pins()
        cmd = pip_install_command(pip, wheels, install_requirements(RUNTIME_PACKAGES, pins))
        if pip != self.python:
            cmd[3:3] = ["--python", self.python]  # pip >= 22.3 installs into another interpreter
        self.shell.run(cmd, "install")
        optional = {}
        for name in OPTIONAL_PACKAGES:
            try:
                self.shell.run(
                    pip_install_command(pip, wheels, install_requirements([name], pins)), "install"
                )
                optional[name] = "installed"
            except StageError as exc:
                optional[name] = f"not installed ({exc}): tracking off"
        after = probe(self.python, ["torch", *RUNTIME_PACKAGES, *OPTIONAL_PACKAGES])
        untouched = (after.get("torch"), after.get("torch_file")) == (
            before.get("torch"),
            before.get("torch_file"),
        )
        figures = {
            "python": self.python,
            "source_python": self.a.python,
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
        self.tracking = bool(after["packages"].get("mlflow"))
        self.stamp.touch()
        return figures

    def _missing_imports(self, modules: list[str]) -> list[str]:
        code = (
            "import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as exc:\n"
            "        print(f'MISSING {m}: {exc}')\n"
        )
        out = subprocess.run(
            [self.python, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT
        ).stdout
        return [line[8:] for line in out.splitlines() if line.startswith("MISSING ")]

    def stage_environment(self) -> dict[str, Any]:
        info = probe(self.python, ["torch", "deepspeed", "megatron-core", "submitit", "mlflow", "numpy"])
        if self.a.device_check == "cuda" and not info.get("cuda_available"):
            err = StageError(f"CUDA not available to {self.python} (torch {info.get('torch')})")
            err.figures = info  # type: ignore[attr-defined]
            raise err
        info["tracking"] = self.tracking
        return info

    def stage_data(self) -> dict[str, Any]:
        corpus = Path(self.a.corpus).resolve()
        if not corpus.is_file():
            raise StageError(f"no corpus at {corpus}: `python -m bench.gpu_check prepare` writes it")
        cfg = self.data_config()
        self.make("data", f"DATA_CONFIG={cfg}", f"CORPUS={corpus}", f"OUT={self.work / 'data'}", log="data")
        manifest = json.loads((self.work / "data" / "manifest.json").read_text())
        return {
            "corpus": str(corpus),
            "vocab_size": manifest.get("vocab_size"),
            "seq_len": manifest.get("seq_len"),
            "splits": {
                k: {"samples": v.get("samples"), "shards": len(v.get("shards", []))}
                for k, v in manifest.get("splits", {}).items()
                if isinstance(v, dict)
            },
        }

    def _run_figures(self, run_dir: Path) -> dict[str, Any]:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        train = [r for r in metrics if "loss" in r]
        steady = train[len(train) // 3 :] or train

        def med(key: str) -> float | None:
            vals = sorted(r[key] for r in steady if isinstance(r.get(key), (int, float)))
            return vals[len(vals) // 2] if vals else None

        return {
            "run_dir": str(run_dir),
            "steps": train[-1]["step"] if train else 0,
            "first_loss": train[0]["loss"] if train else None,
            "final_loss": train[-1]["loss"] if train else None,
            "evals": {
                r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
                for r in metrics
                if any(k.startswith("eval/") for k in r)
            },
            "tokens_per_s_median": med("tokens_per_s"),
            "mfu_median": med("mfu"),
            "peak_memory_mib": max((r.get("peak_memory_mib") or 0) for r in metrics) if metrics else None,
            "runtime": cfg.get("runtime"),
            "params_approx": approx_params(cfg.get("model") or {}),
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")),
            "export": sorted(p.name for p in (run_dir / "export").glob("*")),
        }

    def stage_pretrain(self) -> dict[str, Any]:
        self.train_config()
        run_dir = self.work / "reference"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.monotonic()
        self.shell.run(self.pretrain(run_dir, "pretrain"), "pretrain")
        figures = self._run_figures(run_dir)
        figures["wall_s"] = round(time.monotonic() - t0, 1)
        self.reference_metrics = read_metrics(run_dir / "metrics.jsonl")
        if figures["steps"] != self.a.steps:
            raise StageError(f"reference run logged {figures['steps']} of {self.a.steps} steps")
        if not (run_dir / "export" / "model.safetensors").is_file():
            raise StageError("reference run wrote no export")
        self.export = run_dir / "export"
        return figures

    def stage_resume(self) -> dict[str, Any]:
        run_dir = self.work / "resumed"
        shutil.rmtree(run_dir, ignore_errors=True)
        latest = run_dir / "checkpoints" / "latest"
        cmd = self.pretrain(run_dir, "resume")
        proc = self.shell.start(cmd, "resume")
        deadline = time.monotonic() + max(1.0, self.budget.remaining())
        killed_at = None
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if latest.is_file() and latest.read_text().strip():
                    killed_at = latest.read_text().strip()
                    kill_tree(proc)  # kill -9 of the launcher, submitit's controller and the task
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        log = self.work / "logs" / "resume.log"
        if killed_at is None:
            raise StageError(
                f"the run ended (status {proc.returncode}) before its first checkpoint was published",
                tail(log),
            )
        before = read_metrics(run_dir / "metrics.jsonl")
        stopped_after = max((r["step"] for r in before), default=0)
        if stopped_after >= self.a.steps:
            raise StageError(f"the run finished all {self.a.steps} steps before the kill: nothing to resume")
        resumed_from = int(killed_at.rsplit("-", 1)[-1])
        self.shell.run(cmd, "resume")
        figures = self._run_figures(run_dir)
        resumed_metrics = read_metrics(run_dir / "metrics.jsonl")
        parity = resume_parity(self.reference_metrics, resumed_metrics, self.a.resume_rtol)
        # Steps up to the checkpoint ran before the kill: a difference there is not the resume's
        # (nondeterministic kernels, or code that changed between the two runs).
        early = [r for r in self.reference_metrics if r.get("step", 0) <= resumed_from]
        before_kill = resume_parity(early, resumed_metrics, self.a.resume_rtol)
        figures.update(
            killed_with_latest=killed_at,
            logged_before_kill=stopped_after,
            resumed_from_step=resumed_from,
            max_rel_diff_before_kill=before_kill["max_rel_diff"],
            parity=parity,
        )
        if (run_dir / "export" / "model.safetensors").is_file():
            self.export = run_dir / "export"
        if not self.reference_metrics:
            err = StageError("no reference metrics (the pretrain stage did not pass): parity not checked")
        elif not parity["ok"]:
            err = StageError(
                f"resumed losses differ from the uninterrupted run: max relative diff {parity['max_rel_diff']:.3g} "
                f"at step {parity['worst'].get('step')} ({parity['worst'].get('key')}), tolerance {self.a.resume_rtol:g}; "
                f"missing steps {parity['missing_steps'][:10]}"
                + (
                    f"; the runs already differ before the kill (max {before_kill['max_rel_diff']:.3g} up to "
                    f"step {resumed_from}): nondeterminism or changed code, not the resume"
                    if before_kill["max_rel_diff"] > self.a.resume_rtol
                    else ""
                )
            )
        elif figures["steps"] != self.a.steps or self.export != run_dir / "export":
            err = StageError(f"resumed run ended at step {figures['steps']} without its export")
        else:
            return figures
        err.figures = figures  # type: ignore[attr-defined]
        raise err

    def find_export(self) -> Path | None:
        """The export of this check: the resumed run's, else the reference's (also from an earlier
        invocation, so ``--stages sample,eval`` can be rerun alone)."""
        if self.export is None:
            for run in ("resumed", "reference"):
                if (self.work / run / "export" / "model.safetensors").is_file():
                    self.export = self.work / run / "export"
                    break
        return self.export

    def stage_sample(self) -> dict[str, Any]:
        if self.find_export() is None:
            raise StageError("no export to sample from")
        out = self.make(
            "sample",
            f"CHECKPOINT={self.export}",
            "PROMPT=In the beginning",
            "ARGS=--gen-length 32 --adapt both",
            log="sample",
        )
        return {"export": str(self.export), "output_tail": out[-1500:]}

    def eval_config(self) -> Path:
        n = self.a.eval_n
        return self.write_json_yaml(
            "eval.yaml",
            {
                "out_dir": str(self.work / "eval"),
                "filler": str(Path(self.a.corpus).resolve()),
                "seed": 1000,
                "memory": ["off", "on"],
                "tasks": [
                    {
                        "task": "niah",
                        "context_tokens": self.a.eval_context,
                        "n": n,
                        "difficulty": {"values": 2, "distractors": 1},
                    },
                    {
                        "task": "variable_tracking",
                        "context_tokens": self.a.eval_context,
                        "n": n,
                        "difficulty": {"hops": 2, "distractors": 1},
                    },
                    {
                        "task": "babi",
                        "context_tokens": self.a.eval_context,
                        "n": n,
                        "difficulty": {"hops": 1, "facts": 6},
                    },
                ],
                "scoring": {"batch_size": 8, "mc_samples": 4, "gen_slack": 4, "seed": 0, "precision": "auto"},
                "exposure_bias": {
                    "enabled": True,
                    "data": str(self.work / "data"),
                    "pairs": 8,
                    "prompt_tokens": 96,
                    "response_tokens": 32,
                    "steps": 16,
                    "static_draws": 2,
                },
                "tracking": {"enabled": self.tracking, "root": str(self.work / "mlflow")},
            },
        )

    def stage_eval(self) -> dict[str, Any]:
        if self.find_export() is None:
            raise StageError("no export to evaluate")
        cfg = self.eval_config()
        self.make("eval", f"CHECKPOINT={self.export}", f"EVAL_CONFIG={cfg}", log="eval")
        results = self.work / "eval" / "latest" / "results.json"
        if not results.is_file():
            raise StageError(f"make eval wrote no {results}")
        return {"results": str(results.resolve()), "summary": trim(json.loads(results.read_text()))}

    def stage_bench(self, preset: str) -> dict[str, Any]:
        out = self.work / f"bench_step_{preset}"
        batch = self.a.bench_batch.get(preset, 8)
        self.make(
            "bench-step",
            f"ARGS=--preset {preset} --batch {batch} --steps {self.a.bench_steps} --out {out} {self.a.bench_extra}",
            log=f"bench_step_{preset}",
        )
        r = json.loads(out.with_suffix(".json").read_text())
        keys = [
            "preset", "device", "batch", "seq_len", "params", "steps", "precision", "precision_reason",
            "peak_flops", "peak_flops_source", "mdlm_mfu", "memdlm_mfu", "mdlm_tokens_per_s",
            "memdlm_tokens_per_s", "mdlm_step_s", "memdlm_step_s", "memdlm_over_mdlm_step_ratio",
            "memdlm_over_mdlm_flops_ratio", "step_ratio_over_flops_ratio",
        ]  # fmt: skip
        return {k: r.get(k) for k in keys}

    def stages(self) -> list[Stage]:
        a = self.a
        all_stages = [
            Stage("install", self.stage_install, min_s=20),
            Stage("environment", self.stage_environment, min_s=5, requires=("install",)),
            Stage("data", self.stage_data, min_s=15, requires=("environment",)),
            Stage("pretrain", self.stage_pretrain, min_s=45, requires=("data",)),
            Stage("resume", self.stage_resume, min_s=60, requires=("pretrain",)),
            Stage("sample", self.stage_sample, min_s=15, requires=("pretrain",)),
            Stage("eval", self.stage_eval, min_s=30, requires=("pretrain",)),
        ]
        for preset in a.bench_presets:
            all_stages.append(
                Stage(
                    f"bench_step_{preset}",
                    lambda p=preset: self.stage_bench(p),
                    min_s=a.bench_min_s.get(preset, 30),
                    requires=("environment",),
                )
            )
        if a.stages:
            all_stages = [s for s in all_stages if any(s.name.startswith(w) for w in a.stages)]
        return all_stages


def _kv(text: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, v = item.split("=", 1)
        out[k] = cast(v)
    return out


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check run")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                   help="the interpreter that has the machine's torch")  # fmt: skip
    p.add_argument(
        "--venv", default=None, help="environment to create (default <work>/venv) or, with --no-install, use"
    )
    p.add_argument("--no-install", action="store_true", help="use --venv as it is (it has the packages)")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS))
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu-check"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--budget-s", type=float, default=330.0, help="whole run, install included")
    p.add_argument("--device-check", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="125m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary (the model keeps its own)")
    p.add_argument("--resume-rtol", type=float, default=1e-3)
    p.add_argument("--eval-n", type=int, default=8, help="examples per task")
    p.add_argument("--eval-context", type=int, default=192, help="task context tokens (<= --seq-len)")
    p.add_argument("--bench-presets", default="125m,1b")
    p.add_argument("--bench-steps", type=int, default=8)
    p.add_argument("--bench-batch", default="125m=8,1b=4", help="preset=batch,...")
    p.add_argument("--bench-extra", default="", help="more bench.step flags, e.g. '--peak-budget 10'")
    p.add_argument("--bench-min-s", default="125m=30,1b=70", help="preset=seconds,...: skipped below")
    p.add_argument("--stages", default="", help="comma-separated stage-name prefixes to run (default: all)")
    a = p.parse_args(argv)
    a.bench_presets = [x for x in a.bench_presets.split(",") if x]
    a.bench_batch = _kv(a.bench_batch, int)
    a.bench_min_s = _kv(a.bench_min_s, float)
    a.stages = [x for x in a.stages.split(",") if x]
    return a


def run(argv: list[str]) -> int:
    args = parse_run_args(argv)
    budget = Budget(args.budget_s)
    started = _now()
    check = GpuCheck(args, budget)
    records = run_stages(check.stages(), budget)
    settings = dict(vars(args))
    report = build_report(records, budget, started, settings)
    path = write_report(report, Path(args.out))
    print(
        f"[gpu-check] {'ALL PASSED' if report['ok'] else 'NOT ALL PASSED'} in {report['elapsed_s']:.0f} s; wrote {path}"
    )
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------- prepare (here)
PY312_TAGS = [
    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64", "--platform", "any",
]  # fmt: skip


def dependency_closure(roots: list[str], python_version: str = "3.12") -> dict[str, str]:
    """name -> installed version of ``roots`` and everything they need (markers evaluated for
    ``python_version``), read from this environment; torch and what only torch needs are left out."""
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


def prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check prepare")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS))
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--corpus-mb", type=float, default=3.0, help="text kept from the sample corpus")
    p.add_argument("--with-mlflow", action="store_true", help="also mlflow and its closure (~160 MB)")
    a = p.parse_args(argv)
    wheels = Path(a.wheels)
    wheels.mkdir(parents=True, exist_ok=True)
    roots = RUNTIME_PACKAGES + (OPTIONAL_PACKAGES if a.with_mlflow else [])
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
    write_corpus(Path(a.corpus), int(a.corpus_mb * 2**20))
    return 0


def write_corpus(path: Path, max_bytes: int) -> None:
    """A deterministic slice of the sample corpus (every source represented) as .jsonl.gz."""
    sys.path.insert(0, str(ROOT))
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "prepare"):
        print(__doc__)
        return 2
    return run(argv[1:]) if argv[0] == "run" else prepare(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
