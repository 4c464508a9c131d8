"""On-disk cache of singular-value spectra keyed by a hash of the weight bytes, so a second
analysis (or KappaTune's selection) of the same weights skips the SVDs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"
    return Path(root) / "spectra"


def weight_key(weight: torch.Tensor) -> str:
    data = weight.detach().float().contiguous().cpu()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(str(tuple(data.shape)).encode())
    return digest.hexdigest()


def load_spectrum(key: str) -> torch.Tensor | None:
    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(path)["sigma"]
    except Exception:  # a truncated or foreign file is just a cache miss
        return None


def store_spectrum(key: str, sigma: torch.Tensor) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        save_file({"sigma": sigma.contiguous().cpu()}, str(tmp))
        tmp.replace(folder / f"{key}.safetensors")
    except OSError:
        pass  # a read-only home must not break the analysis; it only loses the speed-up
