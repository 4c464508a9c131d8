"""Every failure as one line: known classes get `error: <what>; <fix>` and exit 2, anything else
one line plus a pointer to `--debug`. No torch / transformers import here: classes from those
libraries are matched by name, so the CLI stays fast to start."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from compressor.errors import CompressorError

DEBUG_ENV = "COMPRESSOR_DEBUG"
BAD_INPUT = 2


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def first_line(err: BaseException, limit: int = 240) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _where(err: OSError) -> str:
    name = str(getattr(err, "filename", None) or "")
    if len(name) > 100:
        name = f"{name[:60]}…{name[-30:]}"
    return f" `{name}`" if name else ""


OS_ERRORS: dict[int, Callable[[OSError], str]] = {
    errno.ENOSPC: lambda e: f"no space left on the device while writing{_where(e)}; free some space or "
                            "choose an --out on another disk (nothing was published)",
    errno.EDQUOT: lambda e: f"disk quota exceeded while writing{_where(e)}; free some space or choose another --out",
    errno.ENAMETOOLONG: lambda e: f"a path is too long{_where(e)}; choose a shorter --out or file name",
    errno.EBUSY: lambda e: f"a file or folder is busy (in use or a mount point){_where(e)}; choose another path",
    errno.EACCES: lambda e: f"permission denied{_where(e)}; choose a writable --out or a readable input",
    errno.EPERM: lambda e: f"operation not permitted{_where(e)}; choose a writable --out or a readable input",
    errno.EROFS: lambda e: f"read-only file system{_where(e)}; choose an --out on a writable disk",
    errno.ENOENT: lambda e: f"no such file or folder{_where(e)}; check the path",
    errno.EISDIR: lambda e: f"expected a file but found a folder{_where(e)}; pass the file itself",
    errno.ENOTDIR: lambda e: f"a path component is not a folder{_where(e)}; check the path",
    errno.EMFILE: lambda e: "too many open files; raise the limit (ulimit -n) and retry",
}


def _by_name(err: BaseException) -> str | None:
    """Library errors matched by class name and module, without importing the library."""
    name, module = type(err).__name__, type(err).__module__ or ""
    if "No space left on device" in str(err) or "os error 28" in str(err):  # safetensors' Rust I/O errors
        return OS_ERRORS[errno.ENOSPC](OSError(errno.ENOSPC, "", None))
    if name == "SafetensorError" or "safetensors" in module or "HeaderTooLarge" in str(err):
        return (f"a .safetensors weights file is truncated or corrupt ({first_line(err, 120)}); re-download or "
                "re-create the checkpoint")
    if name == "KernelUnavailable":
        return f"{first_line(err, 160)}; or set COMPRESSOR_KERNELS=auto (Triton only where it can run)"
    if name == "UnpicklingError":
        return ("refused to unpickle a weights file: it holds more than plain tensors (loaded with "
                "weights_only=True); convert it to safetensors, or use a checkpoint you trust")
    if name in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(err).lower():
        return f"out of memory ({first_line(err, 120)}); use a smaller batch, fewer windows or --device cpu"
    if name == "YAMLError" or module.startswith("yaml"):
        return f"invalid YAML: {first_line(err, 160)}; fix the file"
    if name in ("ArrowInvalid", "ArrowTypeError") or module.startswith("pyarrow"):
        return f"cannot read a data file ({first_line(err, 120)}); pass .txt, .jsonl, .json, .csv, .tsv or .parquet text"
    if "CUDA" in str(err) and ("driver" in str(err) or "not compiled" in str(err) or "ordinal" in str(err)):
        return f"the CUDA device is not available ({first_line(err, 120)}); pass --device cpu or a visible GPU"
    return None


def explain(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for a known failure class; None for an unexpected one."""
    import json

    notes = " ".join(getattr(err, "__notes__", []) or [])
    if isinstance(err, CompressorError):
        return err.exit_code, _with(str(err), notes)
    if isinstance(err, KeyboardInterrupt):
        return 130, _with("interrupted; nothing was published to --out (outputs are staged and renamed only on "
                          "success)", notes)
    if isinstance(err, json.JSONDecodeError):
        return BAD_INPUT, (f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}; fix the file "
                           "(a .jsonl file holds one JSON object per line)")
    if isinstance(err, UnicodeDecodeError):
        return BAD_INPUT, (f"a text file is not UTF-8 ({err.reason} at byte {err.start}); convert it to UTF-8, "
                           "e.g. `iconv -f latin1 -t utf-8 IN > OUT`")
    if isinstance(err, OSError) and err.errno in OS_ERRORS:
        return BAD_INPUT, _with(OS_ERRORS[err.errno](err), notes)
    if isinstance(err, OverflowError):
        return BAD_INPUT, f"a number is out of range ({first_line(err, 120)}); use a smaller value"
    if isinstance(err, RecursionError):
        return BAD_INPUT, "an input is nested too deeply (recursion limit); flatten the recipe or data"
    by_name = _by_name(err)
    return (BAD_INPUT, by_name) if by_name else None


def _with(message: str, notes: str) -> str:
    return f"{message}; {notes}" if notes else message


def unexpected(err: BaseException) -> str:
    return (f"unexpected {type(err).__name__}: {first_line(err)} (run with `--debug` for the traceback, and "
            "please report it)")
