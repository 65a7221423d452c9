"""Cluster launchers that turn one command into a multi-node job: ``python -m megolmo.launch.beaker``."""
