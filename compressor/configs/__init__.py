"""Every method's config, one torch-free module per method, plus the shared bases.

As peft keeps config.py apart from layer.py: a config module holds its method's dataclass (field
defaults, `Args:` docs, `__post_init__` checks) and declares the method once, with class keywords
(`method=`, `kind=`, `apply=` the module that registers the apply). It imports only
`compressor.config`, `compressor.errors` and other config modules, so `compressor methods` and
every `--help` read the dataclasses without torch. The shared bases (`lowrank`, `quant`, `train`,
`HealFields` in `heal`) and `patterns` declare no method. This package's `__init__` imports nothing.
"""
