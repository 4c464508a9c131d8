"""Compression methods, one module each. They register when the registry imports them by name
(registry.BUILTIN), so importing one method imports no other."""
