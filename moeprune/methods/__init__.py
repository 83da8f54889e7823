"""Expert-importance methods: the scorer registry, the built-in scorers, selection, merging."""
