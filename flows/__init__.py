"""Prefect flows: the batch edit over a manifest."""
