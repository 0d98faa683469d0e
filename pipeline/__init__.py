"""Flowers-102 transfer-learning study: a staged, cached pipeline (see README.md)."""
