"""One trainer per run directory: a lock file, ``<run_dir>/run.lock``, held for the whole run.

    lock = acquire(run_dir)        # raises RunLocked naming the holder (host, PID) if another run has it
    ...                            # train
    lock.release()                 # deletes the file; a killed run leaves it behind (stale)

    check_free(run_dir)            # a launcher refusing early (before it rewrites run_dir/config.json)

The kernel decides who holds it: ``flock`` on the open file, released by the kernel when its
process ends in any way (kill -9 included); on NFS (emulated with whole-file byte-range locks
since Linux 2.6.12), GPFS and Lustre mounted with ``flock`` it holds across nodes. The descriptor
is closed in forked children (DataLoader workers), so none of them can keep a dead run's lock.
The file records the holder (host, PID, start time, Slurm job) for the messages:

* the lock is free but the file names a holder: that run was killed; its lock is taken over with a
  ``RunLockWarning`` naming it (a Slurm requeue of a killed job is this case);
* the lock is held and the recorded holder is alive, or on another host: ``RunLocked``;
* the lock is held but the recorded holder is gone (its PID is dead on this host, or it is an
  earlier start of this very Slurm job, e.g. on a node that crashed while its NFS lock lingers):
  after ``wait_s`` (a new holder may be writing its record) the file is replaced by a fresh one,
  locked, with a ``RunLockWarning``.

Within one process the lock is counted, not exclusive: tests build several Trainers on one
run_dir in one process; the file goes only when the last of them releases it.

Standard library only: a launcher imports it without torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "run.lock"
STUCK_WAIT_S = 5.0  # a holder that has just taken the lock writes its record within milliseconds


class RunLocked(RuntimeError):
    """Another live run holds the run directory; the message names the lock file and the holder."""


class RunLockWarning(UserWarning):
    """A lock left by a run that is gone (killed) was taken over."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as recorded in the file."""

    host: str
    pid: int
    boot_id: str = ""  # with the PID namespace: "the same kernel and PID space", not just the same name
    pid_ns: str = ""
    start_ticks: int = -1  # /proc/<pid>/stat start time: a reused PID is not the holder
    since: str = ""
    slurm_job_id: str = ""
    slurm_restart: int = 0

    def __str__(self) -> str:
        job = f", Slurm job {self.slurm_job_id} (restart {self.slurm_restart})" if self.slurm_job_id else ""
        since = f", since {self.since}" if self.since else ""
        return f"host {self.host}, PID {self.pid}{since}{job}"

    def same_machine(self) -> bool:
        """Whether this process can see the holder's PID (same host, boot and PID namespace)."""
        me = _me()
        return (self.host, self.boot_id, self.pid_ns) == (me.host, me.boot_id, me.pid_ns)

    def alive(self) -> bool | None:
        """True/False on this machine; None when the holder is on another one (cannot be told)."""
        if not self.same_machine():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process: alive
        ticks, state = _proc_start(self.pid)
        if state in ("Z", "X"):
            return False
        return self.start_ticks < 0 or ticks < 0 or ticks == self.start_ticks

    def earlier_start_of_my_job(self) -> bool:
        """The holder is a previous start of this Slurm job (a requeue): it cannot be running."""
        me = _me()
        return bool(me.slurm_job_id) and (
            self.slurm_job_id == me.slurm_job_id and self.slurm_restart < me.slurm_restart
        )


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> tuple[int, str]:
    """(start time in clock ticks since boot, state letter) of ``pid``; (-1, "") when unreadable."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return -1, ""
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[19]), fields[0]


def _me() -> Holder:
    pid_ns = ""
    with contextlib.suppress(OSError):
        pid_ns = os.readlink("/proc/self/ns/pid")
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restart = 0
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        pid_ns=pid_ns,
        start_ticks=_proc_start(os.getpid())[0],
        since=time.strftime("%Y-%m-%d %H:%M:%S"),
        slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
        slurm_restart=restart,
    )


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of ``run_dir``."""
    return Path(run_dir) / LOCK_NAME


def _parse(text: str) -> Holder | None:
    try:
        data = json.loads(text)
        if not (
            isinstance(data, dict) and isinstance(data.get("host"), str) and type(data.get("pid")) is int
        ):
            return None
        return Holder(**{k: v for k, v in data.items() if k in Holder.__dataclass_fields__})
    except (ValueError, TypeError):
        return None


def _read_fd(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return _parse(data.decode("utf-8", errors="replace")) if data.strip() else None


def _write_fd(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(holder), sort_keys=True) + "\n").encode())
    os.fsync(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False
        raise


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a releasing holder deletes it; a take-over replaces it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class _Held:
    """The lock as this process holds it: one descriptor, counted users."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd, self.users = path, fd, 1


_HELD: dict[str, _Held] = {}  # real path of the lock file -> this process's hold


def _forget_in_child() -> None:
    # A forked child shares the lock (flock belongs to the open file, not the process): closing its
    # copy of the descriptor leaves the parent's lock alone and lets it die with the parent.
    for held in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """One user's hold of a run directory's lock; :meth:`release` is idempotent."""

    def __init__(self, held: _Held):
        self._held: _Held | None = held
        self.path = held.path

    @property
    def held(self) -> bool:
        return self._held is not None

    def release(self) -> None:
        """Give this hold up; the last one in the process deletes the file and drops the lock."""
        held, self._held = self._held, None
        if held is None:
            return
        held.users -= 1
        if held.users > 0:
            return
        _HELD.pop(str(held.path), None)
        with contextlib.suppress(OSError):
            if _is_current(held.fd, held.path):
                held.path.unlink()  # deleted while still locked: a waiter re-checks the inode
        os.close(held.fd)  # drops the kernel lock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _key(run_dir: str | Path) -> Path:
    return Path(os.path.realpath(lock_path(run_dir)))


def _refusal(path: Path, holder: Holder | None) -> RunLocked:
    who = str(holder) if holder is not None else "a process that has not recorded itself yet"
    return RunLocked(
        f"{path}: the run directory {path.parent} is in use by another trainer ({who}); stop that run "
        "first, or train into another run_dir"
    )


def _stale(holder: Holder | None) -> bool:
    return holder is not None and (holder.alive() is False or holder.earlier_start_of_my_job())


def _take_over_stuck(path: Path, old: Holder) -> int:
    """Replace a lock file whose kernel lock outlived its holder by a fresh, locked one; its fd."""
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_fd(fd, _me())
        os.replace(fresh, path)
    except BaseException:
        os.close(fd)
        fresh.unlink(missing_ok=True)
        raise
    warnings.warn(
        f"{path}: its holder ({old}) is gone but the lock was still held (a leftover process, or an NFS "
        "lock of a crashed node): replaced by a new lock for this run",
        RunLockWarning,
        stacklevel=3,
    )
    return fd


def _wait_or_refuse(path: Path, fd: int, wait_s: float) -> int | None:
    """The lock is held: None once the recorded holder looks alive (refused by the caller), the fd
    of a replacement lock when the recorded holder stays gone for ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = _read_fd(fd)
        if not _stale(holder):
            raise _refusal(path, holder)
        if time.monotonic() >= deadline:
            assert holder is not None  # _stale
            return _take_over_stuck(path, holder)
        time.sleep(0.2)
        if _try_lock(fd):
            return None  # released meanwhile: the caller takes it normally


def _lock_once(path: Path, wait_s: float) -> int | None:
    """One attempt: the locked fd of the file now at ``path``, or None to try again."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try_lock(fd):
            replaced = _wait_or_refuse(path, fd, wait_s)
            if replaced is not None:
                os.close(fd)
                return replaced if _is_current(replaced, path) else _closed(replaced)
        if not _is_current(fd, path):  # its holder deleted or replaced it as we locked it
            return _closed(fd)
        previous = _read_fd(fd)
        _write_fd(fd, _me())
    except BaseException:
        os.close(fd)
        raise
    if previous is not None:
        warnings.warn(
            f"{path}: left by a run that is gone ({previous}: killed, or its node failed); taking it over",
            RunLockWarning,
            stacklevel=3,
        )
    return fd


def _closed(fd: int) -> None:
    os.close(fd)
    return None


def acquire(run_dir: str | Path, wait_s: float = STUCK_WAIT_S) -> RunLock:
    """Take ``run_dir``'s lock for this process (creating ``run_dir``), or raise :class:`RunLocked`.

    A lock left by a killed run is taken over with a :class:`RunLockWarning` naming it. A second
    hold in the same process is counted (see the module docstring)."""
    key = _key(run_dir)
    held = _HELD.get(str(key))
    if held is not None:
        held.users += 1
        return RunLock(held)
    key.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):  # each retry follows a holder deleting or replacing the file under us
        fd = _lock_once(key, wait_s)
        if fd is not None:
            held = _HELD[str(key)] = _Held(key, fd)
            return RunLock(held)
    raise RunLocked(f"{key}: the lock file keeps being replaced; is another run starting in a loop?")


def check_free(run_dir: str | Path) -> None:
    """Raise :class:`RunLocked` (naming the lock file and the holder) when a live run holds
    ``run_dir``; return when it is free, free again after a killed run, or held by this process.

    For a launcher, before it writes into ``run_dir``. Creates nothing."""
    path = _key(run_dir)
    if str(path) in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _try_lock(fd):
            return  # closing the fd below drops the probe's lock at once
        holder = _read_fd(fd)
        if not _stale(holder):
            raise _refusal(path, holder)
    finally:
        os.close(fd)
