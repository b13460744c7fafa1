"""midi-rae: hierarchical representations of symbolic music."""
__version__ = "0.1.0"
