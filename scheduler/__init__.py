"""Request life cycle, paged block bookkeeping and replica scheduling policies.

This package never imports torch: the engine and the simulator share it.
"""
