"""HALO slim device runtime: executes a compiled plan (see plan.py, coordinator.py, worker.py)."""
__version__ = "0.1.0"
