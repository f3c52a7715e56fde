"""Streaming input: manifest, tokenizer checks, resumable WebDataset batches."""
