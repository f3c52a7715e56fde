"""Every change we make to a third-party library, in one place, one module per library.

    from pipeline.patches import megatron as megatron_patches
    megatron_patches.apply()          # at start, before the first model is built

Each patch is a :class:`Patch`: what it changes, why, the library version it was written for and
the test that shows the unpatched library still needs it (tests/unit/test_patches.py: when that
test starts failing, upstream fixed the problem and the patch is deleted). :func:`require` checks
the installed version before a patch is applied and stops with a message naming the patch, the
version it was written for and the installed one: a pin that moved is a decision, not an accident.
``MEMDLM_ALLOW_UNTESTED_PATCHES=1`` applies them anyway, with a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import metadata

ALLOW_ENV = "MEMDLM_ALLOW_UNTESTED_PATCHES"


class PatchVersionError(RuntimeError):
    """A patch meets a library version it was not written for."""


@dataclass(frozen=True)
class Patch:
    name: str  # "<library>.<what>", e.g. "megatron.cpu_autocast_backward"
    distribution: str  # the installed distribution it patches (importlib.metadata name)
    written_for: str  # the version it was written and tested against
    why: str
    test: str  # the test proving the unpatched library still needs it


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def require(patch: Patch) -> None:
    """Raise PatchVersionError unless ``patch.distribution`` is at ``patch.written_for``."""
    have = installed_version(patch.distribution)
    if have == patch.written_for:
        return
    message = (
        f"library patch {patch.name} was written for {patch.distribution} {patch.written_for}, but "
        f"{have or 'no version'} is installed ({patch.why}). Install the pinned version (requirements.txt), "
        f"or check whether the new version still needs it ({patch.test}) and update pipeline/patches/; "
        f"{ALLOW_ENV}=1 applies it anyway"
    )
    if os.environ.get(ALLOW_ENV, "").strip() in ("1", "true", "yes"):
        warnings.warn(message, stacklevel=2)
        return
    raise PatchVersionError(message)
