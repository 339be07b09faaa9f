"""The version of hf_kd (read by the package and by the records it writes)."""

__version__ = "0.1.0"
