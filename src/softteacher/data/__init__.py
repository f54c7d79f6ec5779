"""Datasets, splits, samplers and views."""
