"""HALO offline planning compiler."""
__version__ = "0.1.0"
