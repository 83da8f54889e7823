"""Selective sharded loading of kept experts (installed as moeprune.loader)."""
