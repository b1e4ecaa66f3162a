"""Benchmarks that reproduce the paper's experiments at the scale of the hardware at hand."""
