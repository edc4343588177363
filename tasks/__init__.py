"""Prefect tasks: each a thin wrapper around one :mod:`lregions_core.stages` stage, run over a
chunk of manifest rows with per-row failure isolation."""
