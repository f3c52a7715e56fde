"""One seed derivation for every seeded stream: training noise, data order, sampler rows, tasks.

``seed_of(*parts)`` hashes ``repr(parts)`` (sha256, 63 bits): the same in every process and on
every machine, unlike Python's salted ``hash``, and independent of how many other draws happened.
"""

from __future__ import annotations

import hashlib


def seed_of(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (ints, strings, lists of ints)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
