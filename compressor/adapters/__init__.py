"""compressor.adapters — fine-tuning methods, one module each. They register when the registry
imports them by name (the `apply=` of their configs), so importing one imports no other (nor peft,
unless it is the one that needs it)."""
