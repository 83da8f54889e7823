"""Checkpoint I/O: sharded checkpoints, atomic writes, pruned exports and engine compatibility."""
