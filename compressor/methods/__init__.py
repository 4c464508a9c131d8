"""Compression methods, one module each. They register when the registry imports them by name
(the `apply=` their configs in compressor/configs/ declare), so importing one method imports no
other."""
