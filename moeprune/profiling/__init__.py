"""Profiling: streaming router statistics over demo tokens, in memory or one layer at a time."""
