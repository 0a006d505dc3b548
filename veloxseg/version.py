"""The veloxseg release (the package's and the weights package's version)."""

__version__ = "0.1.0"
