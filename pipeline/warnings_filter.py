"""Known-harmless warnings of our stack, silenced once, in one place (each says why it is harmless).

Called by the trainer and the commands before the libraries are imported; nothing else in the
code filters warnings.
"""

from __future__ import annotations

import warnings

KNOWN_HARMLESS = (
    # megatron-core falls back to its pure-PyTorch kernels; it says so from eight modules per start
    (r"Transformer Engine and Apex are not installed", UserWarning),
    # megatron-core 0.16 announces an import path that moves in a later release
    (r"The following imports from `dynamic_context\.py`", DeprecationWarning),
    # DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 deprecates: every step
    (r"`torch\.distributed\.\w+` is deprecated", FutureWarning),
    (r"Warning\. tp_group is None", DeprecationWarning),
)


def quiet_known_warnings() -> None:
    for message, category in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
