"""A local run listens on loopback only, and credentials in tracking.uri are never written out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.tracking import redact_config, redact_uri
from tests import _proc
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

# Prints the local address of every TCP socket this process listens on (from /proc, no tools).
PROBE = r"""
import json, os, socket, struct
from pipeline.parallel.dims import init_distributed
init_distributed(tp=1)
mine = set()
for fd in os.listdir("/proc/self/fd"):
    target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(f"/proc/self/fd/{fd}") else ""
    if target.startswith("socket:["):
        mine.add(target[8:-1])
out = []
for table, family in (("/proc/self/net/tcp", 4), ("/proc/self/net/tcp6", 6)):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in mine:  # LISTEN
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            if family == 4:
                ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(addr, 16)))
            else:
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i+4][::-1] for i in range(0, 16, 4)))
            out.append([ip, int(port, 16)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_single_node_rendezvous_and_gloo_listen_on_loopback_only():
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("GLOO_SOCKET_IFNAME", None)
    proc = _proc.run([sys.executable, "-c", PROBE], env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [int(env["MASTER_PORT"])] == [p for ip, p in listening if p == int(env["MASTER_PORT"])]
    assert listening and all(ip.startswith("127.") or ip == "::1" for ip, _ in listening), listening


def test_tracking_uri_credentials_are_redacted():
    assert redact_uri("https://alice:s3cret@mlflow.example.org:5000/x") == "https://mlflow.example.org:5000/x"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    resolved = {"tracking": {"uri": "http://bob:pw@host/"}, "seed": 0}
    out = redact_config(resolved)
    assert "pw" not in json.dumps(out) and out["seed"] == 0
    assert resolved["tracking"]["uri"] == "http://bob:pw@host/"  # the live config keeps working
