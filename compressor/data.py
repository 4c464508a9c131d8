"""Text sources -> token windows.

A source is `"default"` (the TinyStories excerpt shipped with the package), a local
.txt/.jsonl/.csv/.tsv file, or a `datasets` name (`name`, `name:config` or `name:config:split`,
needs the Hub or a local HF cache). Texts are joined into one token stream; the stream's first
part is the `train`/`calib` split and its last `eval_fraction` the `eval` split, so calibration or
training text never overlaps evaluation text.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import torch

from .errors import DataError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_TEXT = ASSETS / "text" / "tinystories_excerpt.txt"
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
TEXT_COLUMNS = ("text", "sentence", "content", "document")
SPLITS = ("train", "calib", "eval")
MIN_CALIBRATION_WINDOWS = 64


def load_texts(source: str = "default", text_column: str | None = None) -> list[str]:
    """Read the documents of a text source (see module docstring)."""
    if source in (None, "", "default"):
        return _read_txt(DEFAULT_TEXT)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return _read_file(path, text_column)
        except UnicodeDecodeError as err:
            raise DataError(f"data file `{path}` is not UTF-8 text ({err.reason} at byte {err.start}); pass UTF-8 "
                            ".txt/.jsonl/.csv/.tsv (parquet and other binary formats are not read)") from None
        except json.JSONDecodeError as err:
            raise DataError(f"data file `{path}` has a line that is not valid JSON ({err.msg}); each .jsonl line "
                            "must be one JSON object") from None
    if path.suffix in TEXT_SUFFIXES or path.exists() or str(source).startswith((".", "/", "~")):
        raise DataError(f"data file `{source}` does not exist; pass an existing .txt/.jsonl/.csv/.tsv file or `default`")
    return _read_hf_dataset(str(source), text_column)


def _read_file(path: Path, text_column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt" or suffix == ".raw" or suffix not in TEXT_SUFFIXES:
        return _read_txt(path)
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if not rows:
        raise DataError(f"data file `{path}` has no rows")
    column = text_column or next((c for c in TEXT_COLUMNS if c in rows[0]), None)
    if column is None or column not in rows[0]:
        raise DataError(
            f"data file `{path}` has no text column `{text_column or 'text'}` "
            f"(columns: {', '.join(map(str, rows[0]))}); pass `text_column`"
        )
    return [str(r[column]) for r in rows if r.get(column)]


def _read_txt(path: Path) -> list[str]:
    # newline="" keeps CRLF files (WikiText) from doubling blank lines; normalise by hand.
    with path.open(encoding="utf-8", newline="") as handle:
        text = handle.read().replace("\r\n", "\n")
    return [text] if text.strip() else []


def _read_hf_dataset(name: str, text_column: str | None) -> list[str]:
    parts = name.split(":")
    dataset_name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets

        logging.getLogger("datasets").setLevel(logging.ERROR)
        ds = datasets.load_dataset(dataset_name, config, split=split)
    except Exception as err:  # datasets raises many types when offline or misnamed
        raise DataError(
            f"could not load dataset `{name}` ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            "use a local .txt/.jsonl/.csv/.tsv file, or check the name and your connection"
        ) from None
    column = text_column or next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if column is None:
        raise DataError(f"dataset `{name}` has no text column (columns: {ds.column_names}); pass `text_column`")
    return [t for t in ds[column] if t and t.strip()]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize documents into one 1-D LongTensor, documents separated by EOS."""
    if not texts:
        raise DataError("the text source is empty; pass a file with text in it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pieces = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
            pieces.extend(ids)
            if tokenizer.eos_token_id is not None and len(texts) > 1:
                pieces.append(tokenizer.eos_token_id)
    return torch.tensor(pieces, dtype=torch.long)


def split_stream(stream: torch.Tensor, split: str, eval_fraction: float = 0.5) -> torch.Tensor:
    """First part = train/calib, last `eval_fraction` = eval: never overlapping."""
    if split not in SPLITS:
        raise DataError(f"`split` must be one of {SPLITS}, got {split!r}")
    cut = int(len(stream) * (1.0 - eval_fraction))
    return stream[cut:] if split == "eval" else stream[:cut]


def make_windows(
    stream: torch.Tensor, seq_len: int, num_windows: int | None, seed: int = 0, shuffle: bool = True
) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len). A seeded random subset when fewer are asked for."""
    if seq_len < 2:
        raise DataError(f"`seq_len` must be at least 2, got {seq_len}")
    available = len(stream) // seq_len
    if available == 0:
        raise DataError(
            f"the text has {len(stream)} tokens, fewer than one window of {seq_len}; "
            "use more text or a smaller `seq_len`"
        )
    windows = stream[: available * seq_len].view(available, seq_len)
    if num_windows is None or num_windows >= available:
        return windows
    if num_windows <= 0:
        raise DataError(f"`num_windows` must be positive, got {num_windows}")
    if not shuffle:
        return windows[:num_windows]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available, generator=generator)[:num_windows]
    return windows[order.sort().values]


_STREAMS: dict[tuple, tuple[object, torch.Tensor]] = {}


def _cached_stream(source: str, tokenizer, text_column: str | None) -> torch.Tensor:
    """Tokenize a source once per tokenizer (calibration, training and eval reuse it)."""
    key = (source, id(tokenizer), text_column)
    if key not in _STREAMS:
        if len(_STREAMS) > 16:
            _STREAMS.clear()
        # The tokenizer is kept in the value so its id() cannot be reused while cached.
        _STREAMS[key] = (tokenizer, token_stream(tokenizer, load_texts(source, text_column)))
    return _STREAMS[key][1]


def windows_for(
    tokenizer,
    source: str = "default",
    *,
    split: str = "calib",
    seq_len: int = 256,
    num_windows: int | None = None,
    seed: int = 0,
    text_column: str | None = None,
    eval_fraction: float = 0.5,
) -> torch.Tensor:
    """Token windows (N, seq_len) from `source`'s `split`. Eval windows are taken in order."""
    stream = _cached_stream(str(source or "default"), tokenizer, text_column)
    part = split_stream(stream, split, eval_fraction)
    return make_windows(part, seq_len, num_windows, seed, shuffle=split != "eval")
