"""Data preparation: corpus reading, tokenisation, sharding and the sample corpus."""
