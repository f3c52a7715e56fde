"""A stand-in for pipeline.train under launch.local (``--module tests.faults._local_worker``): no torch.

    python -m tests.faults._local_worker <out dir> <mode>

Writes ``<out>/<rank>.json`` (its pid and the distributed variables it was given), then by mode:
``wait``: waits for a signal, records each one in ``<out>/<rank>.signals`` and exits 3 on SIGTERM
(as pipeline.train after its checkpoint); ``fail``: rank 1 exits 7 once every rank has written its file, the
others wait and ignore SIGTERM (only SIGKILL ends them).
"""

import json
import os
import signal
import sys
import time

out, mode = sys.argv[1], sys.argv[2]
rank = os.environ["RANK"]
keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def record(signum, frame):
    with open(os.path.join(out, f"{rank}.signals"), "a") as f:
        f.write(signal.Signals(signum).name + "\n")
    if signum == signal.SIGTERM and mode == "wait":
        sys.exit(3)


for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, record)
with open(os.path.join(out, f"{rank}.tmp"), "w") as f:
    json.dump({"pid": os.getpid(), "sid": os.getsid(0), **{k: os.environ.get(k) for k in keys}}, f)
os.rename(os.path.join(out, f"{rank}.tmp"), os.path.join(out, f"{rank}.json"))
if mode == "fail" and rank == "1":
    # once every rank handles its signals (a SIGTERM during a peer's start-up would just kill it)
    while len([n for n in os.listdir(out) if n.endswith(".json")]) < int(os.environ["WORLD_SIZE"]):
        time.sleep(0.01)
    sys.exit(7)
while True:
    time.sleep(1)
