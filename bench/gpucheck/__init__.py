"""The GPU check's library; ``bench/gpu_check.py`` is its command line (``python -m bench.gpu_check``).

* :mod:`~bench.gpucheck.common`: the repository root, the carried files' places, the package lists.
* :mod:`~bench.gpucheck.runner`: stages, the global time budget, the stage runner.
* :mod:`~bench.gpucheck.shell`: a stage's commands, logged, killed with their children at the budget.
* :mod:`~bench.gpucheck.report`: the JSON report.
* :mod:`~bench.gpucheck.environment`: what the machine's interpreter has (torch, CUDA, GPU, packages).
* :mod:`~bench.gpucheck.install`: the offline install into a venv that keeps the machine's torch.
* :mod:`~bench.gpucheck.configs`: the data / training / eval configs the check writes.
* :mod:`~bench.gpucheck.figures`: figures of a finished run (losses, throughput, checkpoints).
* :mod:`~bench.gpucheck.parity`: the resumed run's losses against the uninterrupted run's.
* :mod:`~bench.gpucheck.check`: the stages themselves, in order.
* :mod:`~bench.gpucheck.prepare`: here, with the registries: the wheels and corpus to carry there.

Standard library only (``prepare`` aside): it runs on the bare machine's Python before any package
is installed.
"""
