"""A torchrun worker that never finishes: records its pids, starts a grandchild, sleeps.

Written as ``<out>/<rank>``: ``<torchrun pid> <worker pid> <grandchild pid>``. No torch import, so
it is ready long before the launching test's timeout.
"""

import os
import subprocess
import sys
import time

out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
rank = os.environ["RANK"]
with open(os.path.join(out, f"{rank}.tmp"), "w") as f:
    f.write(f"{os.getppid()} {os.getpid()} {child.pid}")
os.rename(os.path.join(out, f"{rank}.tmp"), os.path.join(out, rank))
time.sleep(3600)
