"""The masked-diffusion forward process and its losses (docs/method.md sections 1 and 3): what the
objectives (pipeline/objectives) and the memory's inner loop (pipeline/memory) both compute with."""
