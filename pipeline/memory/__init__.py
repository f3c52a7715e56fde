"""MemDLM parametric memory: fast weights and the anchor-consistent inner loop."""
