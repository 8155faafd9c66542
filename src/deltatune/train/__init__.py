"""Training a delta: batches, the loop, checkpoints, metrics."""
