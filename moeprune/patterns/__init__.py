"""Patterns: per-task kept-expert selections, the pattern store and retrieval."""
