"""Training objectives: the MDLM loss (schedules, masking, weighting)."""
