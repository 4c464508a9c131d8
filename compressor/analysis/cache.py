"""On-disk cache of singular-value spectra keyed by a hash of the weight bytes, so a second
analysis (or KappaTune's selection) of the same weights skips the SVDs.

An entry is trusted only when it proves it belongs to its key: the key (weight hash plus the
matrix shape) and a checksum of the stored values are in the file's metadata, and the values are
min(m, n) finite, non-negative, descending singular values. Anything else (a truncated, edited or
foreign file) is a miss: the spectrum is recomputed and the entry rewritten."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"
    return Path(root) / "spectra"


def weight_key(weight: torch.Tensor) -> str:
    """`<hash of the weight's bytes and shape>-<out>x<in>`: the shape is readable, so an entry can
    be checked against the length its spectrum must have."""
    data = weight.detach().float().contiguous().cpu()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(str(tuple(data.shape)).encode())
    rows = data.shape[0] if data.dim() else 1
    return f"{digest.hexdigest()}-{rows}x{data.numel() // max(rows, 1)}"  # the (out, -1) matrix the SVD sees


def _checksum(key: str, sigma: torch.Tensor) -> str:
    return hashlib.blake2b(key.encode() + sigma.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _expected_length(key: str) -> int | None:
    dims = key.rpartition("-")[2].split("x")
    return min(int(d) for d in dims) if len(dims) == 2 and all(d.isdigit() for d in dims) else None


def load_spectrum(key: str) -> torch.Tensor | None:
    """The cached spectrum of `key`, or None when there is none or it fails any check above."""
    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            sigma = handle.get_tensor("sigma")
    except Exception:  # a truncated or foreign file is just a cache miss
        return None
    return sigma if _valid(key, sigma, metadata) else None


def _valid(key: str, sigma: torch.Tensor, metadata: dict[str, str]) -> bool:
    if metadata.get("key") != key or sigma.dim() != 1 or sigma.dtype != torch.float32:
        return False
    if sigma.numel() != _expected_length(key) or metadata.get("checksum") != _checksum(key, sigma):
        return False
    return bool(torch.isfinite(sigma).all() and (sigma >= 0).all() and (sigma[:-1] >= sigma[1:]).all())


def store_spectrum(key: str, sigma: torch.Tensor) -> None:
    folder = cache_dir()
    sigma = sigma.detach().float().contiguous().cpu()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        save_file({"sigma": sigma}, str(tmp), metadata={"key": key, "checksum": _checksum(key, sigma)})
        tmp.replace(folder / f"{key}.safetensors")
    except OSError:
        pass  # a read-only home must not break the analysis; it only loses the speed-up
