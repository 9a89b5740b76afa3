"""Generative question answering: the `generate` task family."""
