"""Text sources -> token windows.

A source is one of
  * `default`: the TinyStories excerpt shipped with the package;
  * a local file: .txt (the whole file is one document), .jsonl (one JSON object per line),
    .json (a list of objects, or {"data"/"rows"/...: [objects]}), .csv, .tsv or .parquet; tabular
    files give one document per row, read from `text_column` (default: the first of `text`,
    `sentence`, `content`, `document` present);
  * a Hugging Face `datasets` name `NAME[:CONFIG[:SPLIT]]`, e.g. `wikitext:wikitext-2-raw-v1:test`
    (SPLIT defaults to `train`); it needs the Hub or a local HF cache.
Texts are joined into one token stream; the stream's first part is the `train`/`calib` split and
its last `eval_fraction` the `eval` split, so calibration or training text never overlaps
evaluation text.
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
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
FILE_KINDS = "a .txt/.jsonl/.json/.csv/.tsv/.parquet file"
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
        raise DataError(f"data file `{source}` does not exist; pass an existing {FILE_KINDS} or `default`")
    return _read_hf_dataset(str(source), text_column)


def _read_file(path: Path, text_column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES or suffix == ".txt":
        return _read_txt(path)
    try:
        rows = _read_rows(path, suffix)
    except UnicodeDecodeError as err:
        raise DataError(_undecodable(path, err)) from None
    except (ValueError, csv.Error) as err:  # json.JSONDecodeError is a ValueError
        kind = {".jsonl": "JSON", ".json": "JSON", ".parquet": "Parquet"}.get(suffix, suffix[1:].upper())
        raise DataError(f"data file `{path}` is not valid {kind} ({str(err).splitlines()[0][:160]}); "
                        f"fix the file or convert it to {FILE_KINDS}") from None
    if not rows:
        raise DataError(f"data file `{path}` has no rows")
    column = pick_text_column(list(rows[0]), text_column, f"data file `{path}`")
    return [str(r[column]) for r in rows if r.get(column)]


def pick_text_column(columns: list[str], text_column: str | None, where: str) -> str:
    """The named column, else the first usual text column present; a DataError naming the columns."""
    column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        raise DataError(f"{where} has no text column `{text_column or 'text'}` (columns: "
                        f"{', '.join(map(str, columns))}); pass --text-column NAME (recipes: `text_column`)")
    return column


def _read_rows(path: Path, suffix: str) -> list[dict]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except OSError as err:  # pyarrow reports a damaged footer / metadata as an OSError
            if err.errno is not None:
                raise  # a real I/O failure (permissions, ...) keeps its own message
            raise ValueError(str(err)) from None
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        return _json_rows(json.loads(path.read_text(encoding="utf-8")), path)
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))


def _json_rows(payload, path: Path) -> list[dict]:
    """A list of objects, or one object holding such a list (e.g. {"data": [...]})."""
    if isinstance(payload, dict):
        lists = [v for v in payload.values() if isinstance(v, list)]
        payload = lists[0] if len(lists) == 1 else payload
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise DataError(f"data file `{path}` must hold a list of objects (one per document), e.g. "
                        '[{"text": "..."}]; or use .jsonl with one object per line')
    return payload


def _undecodable(path: Path, err: UnicodeDecodeError) -> str:
    return (f"data file `{path}` is not UTF-8 text (undecodable byte at position {err.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`")


def _read_txt(path: Path) -> list[str]:
    # newline="" keeps CRLF files (WikiText) from doubling blank lines; normalise by hand.
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            text = handle.read().replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise DataError(_undecodable(path, err)) from None
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
        first = (str(err).splitlines() or [""])[0][:160]
        raise DataError(
            f"could not load dataset `{name}` (read as NAME[:CONFIG[:SPLIT]]; {type(err).__name__}: {first}); "
            f"without a connection or HF cache, save the text locally and pass the path ({FILE_KINDS}), "
            "or check the name"
        ) from None
    column = pick_text_column(list(ds.column_names), text_column, f"dataset `{name}`")
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
