"""Parallel dimensions and the collectives built on them (process groups, rank-0 decisions)."""
