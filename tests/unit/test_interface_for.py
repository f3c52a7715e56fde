"""The network interface init_distributed gives gloo (GLOO_SOCKET_IFNAME) for a MASTER_ADDR.

Across hosts this is tested on the two-node Slurm (tests/integration/test_slurm_2node.py); here,
the cases one host has: loopback, and an address of one of its own interfaces.
"""

from __future__ import annotations

import socket

import pytest

from pipeline.parallel.rendezvous import interface_for
from pipeline.parallel.rendezvous import ipv4_of as _ipv4_of


def test_a_loopback_master_addr_is_reached_through_lo():
    assert interface_for("127.0.0.1") == "lo"
    assert interface_for("localhost") == "lo"  # /etc/hosts


def test_an_address_of_this_host_is_reached_through_the_interface_holding_it():
    own = [(name, ip) for _, name in socket.if_nameindex() if (ip := _ipv4_of(name)) and name != "lo"]
    if not own:
        pytest.skip("no IPv4 interface besides loopback")
    for name, ip in own:  # a UDP connect() to one's own address sends nothing
        assert interface_for(ip) == name
