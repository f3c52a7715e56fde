"""Launchers: resolve a cluster config and start training (local or Slurm, via submitit)."""
