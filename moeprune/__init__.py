"""Task-adaptive expert pruning for Mixture-of-Experts language models."""
