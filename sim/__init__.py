"""Simulator for placement experiments: Tandem's own schedulers and router on simulated replicas.

Never imports torch. See sim/README.md for the model and its limits.
"""
