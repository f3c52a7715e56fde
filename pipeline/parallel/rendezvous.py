"""Where ranks meet: the rendezvous store and the network interface collectives use.

    store = rendezvous_store(rank, world, "127.0.0.1", 29500, timedelta(minutes=10))
    iface = interface_for("node001")          # the interface this host reaches MASTER_ADDR through

torch's own ``env://`` rendezvous listens on every interface of rank 0's host with no
authentication; binding the store's listening socket ourselves keeps a local run on loopback and a
multi-node run on the interface MASTER_ADDR resolves to. Gloo and NCCL are pointed at that
interface too (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``) unless the user chose one.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import socket
import struct

import torch.distributed as dist

# Set when the interface variables below were chosen here, not by the user: a job launched from
# this process must choose its own (launch/submit.py drops them), or a local run's "lo" would
# follow a test or a login shell into a multi-node job.
AUTO_IFNAME = "MEMDLM_AUTO_SOCKET_IFNAME"
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def ipv4_of(ifname: str) -> str | None:
    """The (primary) IPv4 address of interface ``ifname`` (Linux ``SIOCGIFADDR``), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_for(addr: str) -> str | None:
    """The network interface this host reaches ``addr`` (a name or IPv4 address) through.

    On MASTER_ADDR's own host that is the interface holding its address; on the other nodes, the
    one the kernel routes to it by. Found by connecting a UDP socket (which picks the route and
    the source address, and sends nothing) and looking the source address up among the
    interfaces. None where it cannot be told (the address does not resolve, no interface holds it).
    """
    try:
        ip = socket.gethostbyname(addr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            source = s.getsockname()[0]
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if ipv4_of(name) == source), None)


def rendezvous_store(rank: int, world: int, addr: str, port: int, timeout: datetime.timedelta) -> dist.Store:
    """The TCP key-value store ranks meet at, served by rank 0 on ``addr`` only."""
    if rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    ip = socket.gethostbyname(addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(128)
    # detach: the store's server owns the listening fd from here on
    return dist.TCPStore(ip, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())


def choose_interface(addr: str) -> None:
    """Point gloo and NCCL at the interface that reaches ``addr`` (``lo`` for a loopback address),
    unless the user set one."""
    iface = "lo" if is_loopback(addr) else interface_for(addr)
    if not iface:
        return
    if any(os.environ.get(v) for v in IFNAME_VARS) and not os.environ.get(AUTO_IFNAME):
        return  # the user's choice wins
    for var in IFNAME_VARS:
        os.environ[var] = iface
    os.environ[AUTO_IFNAME] = "1"


def drop_chosen_interface() -> None:
    """Forget an interface this process chose for itself (before starting another world's job)."""
    if os.environ.pop(AUTO_IFNAME, None):
        for var in IFNAME_VARS:
            os.environ.pop(var, None)
