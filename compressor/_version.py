"""The package version, in a module of its own so that modules below `compressor/__init__`
(the checkpoint format writes it into config.json) can read it without importing the package."""

__version__ = "0.1.0"
