"""Read-only analysis: spectra.py (pure maths), cache.py (spectra by weight hash), sweep.py (σ of
every selected linear) and the `analyze` stage (analyze.py). Importing the package registers
nothing: the registry imports analyze.py by name."""
