"""Tidings: a real-time update hub speaking the Mercure protocol over Server-Sent Events."""

__version__ = "0.1.0"

__all__ = ["__version__"]
