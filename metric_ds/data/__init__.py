"""Data: reading, validation, labels, split, balance, samplers, collation, preparation and summaries."""
