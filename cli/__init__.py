"""compressor.cli: the Typer app (one thin file per command; no method logic here)."""
