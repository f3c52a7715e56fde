"""What the machine is: the training device, its precision, its collective backend, its peak FLOP/s.

Nothing here times anything on the training path: decisions come from torch's own capability
checks and from a table of known accelerators (see :mod:`pipeline.hardware.peak`).
"""
