"""The training data stream: resumable, rank-balanced WebDataset batches (pipeline/loader/stream.py)."""
