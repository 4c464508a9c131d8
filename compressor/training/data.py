"""Data for fine-tuning: causal-LM token windows, or labelled examples for classification.

* lm: `ctx.windows(data, split="train")` for training and `split="eval"` (or `eval_data`) for
  evaluation; the lead's data layer guarantees the two splits never overlap.
* classification: rows of a .tsv/.csv/.jsonl file with a text and a label column. The rows are
  shuffled with the seed, `num_eval` of them are held out (unless `eval_data` is given), and
  training rows are drawn from the rest only (optionally k per label). Two ways to train:
  - prompt + label words (causal LMs, MeZO's setting): the text is put into `prompt` and the
    loss is the cross entropy over the label words' logits at the last prompt position;
  - a classification head (encoders): the model's own `logits` (B, num_labels), or mean-pooled
    hidden states through a linear head that `attach_classification_head` adds.

The batch order is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from compressor.errors import DataError
from compressor.evaluation import heldout_windows
from compressor.preflight import context_of
from compressor.protocol import PROTOCOL
from compressor.training.config import TrainConfig

LABELLED_SUFFIXES = (".tsv", ".csv", ".jsonl")
TEXT_COLUMN_GUESSES = ("text", "sentence", "content", "review")
HEAD_NAME = "classification_head"


@dataclass
class TaskData:
    """Tokenised training and evaluation tensors (leading dim = examples) plus label metadata.

    train/eval: {"input_ids": (N, T)} for lm; classification adds "attention_mask" (N, T) and
    "labels" (N,) with class indices into `labels`. `label_token_ids` (C,) is set in prompt mode.
    order: "shuffled" (a seeded permutation per epoch) or "in_order" (the rows as stored, cut into
    consecutive batches, the last one shorter when `batch_size` does not divide N: the batches of
    `train["input_ids"].split(batch_size)`, cycled; see `in_order_windows`).
    """

    task: str
    train: dict[str, Tensor]
    eval: dict[str, Tensor]
    labels: tuple[str, ...] = ()
    label_token_ids: Tensor | None = None
    order: str = "shuffled"
    _perms: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_train(self) -> int:
        return len(self.train["input_ids"])

    @property
    def num_eval(self) -> int:
        return len(self.eval["input_ids"])

    def train_batch(self, index: int, batch_size: int, seed: int) -> dict[str, Tensor]:
        """Micro-batch number `index` of an endless stream of seeded epoch permutations (or of
        the stored order, for `order` "in_order")."""
        if self.order == "in_order":
            batches = -(-self.num_train // batch_size)  # ceil: a last, shorter batch counts
            start = (index % batches) * batch_size
            return {k: v[start : start + batch_size] for k, v in self.train.items()}
        positions = torch.arange(index * batch_size, (index + 1) * batch_size)
        rows = torch.empty_like(positions)
        for epoch in positions.div(self.num_train, rounding_mode="floor").unique().tolist():
            at = positions.div(self.num_train, rounding_mode="floor") == epoch
            rows[at] = self._permutation(epoch, seed)[positions[at] % self.num_train]
        return {k: v[rows] for k, v in self.train.items()}

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        for start in range(0, self.num_eval, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.eval.items()}

    def tokens_per_batch(self, batch: dict[str, Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def _permutation(self, epoch: int, seed: int) -> Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_train, generator=generator)
        return self._perms[epoch]


def in_order_windows(windows: Tensor) -> TaskData:
    """Token windows (N, T) trained on in their stored order, with no held-out set: for loops
    whose caller evaluates on its own and whose batch order is part of the method (dsformer's
    STF, maestro's epochs)."""
    return TaskData(task="lm", train={"input_ids": windows}, eval={"input_ids": windows[:0]}, order="in_order")


def build_task_data(config: TrainConfig, ctx, model: nn.Module | None = None) -> TaskData:
    """Load and tokenise `config.data` / `config.eval_data` for `config.task`."""
    data = (
        _lm_data(config, ctx, model) if config.task == "lm" else _classification_data(config, ctx, model)
    )
    if data.num_train < config.batch_size:
        raise DataError(
            f"`data` {config.data!r} gave {data.num_train} training "
            f"{'windows' if config.task == 'lm' else 'examples'}, fewer than one batch "
            f"(`batch_size`={config.batch_size}); lower `batch_size`"
            f"{' or `seq_len`' if config.task == 'lm' else ' or `num_eval`'} or give more data"
        )
    if data.num_eval == 0:
        raise DataError(
            f"`eval_data` {config.eval_data or config.data!r} gave no evaluation examples"
        )
    return data


def _lm_data(config: TrainConfig, ctx, model: nn.Module | None = None) -> TaskData:
    # Every window (or a seeded `num_train` subset), never a count derived from `steps`: a run
    # cut short and resumed must see the same data as one that ran straight through.
    train = ctx.windows(
        config.data, split="train", seq_len=config.seq_len, num_windows=config.num_train,
        text_column=config.text_column,
    )
    # Held-out windows follow the one evaluation protocol (compressor.evaluation), not the
    # training seq_len, so the stage's perplexity equals `compressor eval`'s on the same text.
    # A model whose context is shorter than the run's windows is scored on windows of its context
    # length (longer ones would index past its position embeddings).
    spec = getattr(ctx, "evaluate", None) or PROTOCOL
    context = context_of(getattr(model, "config", None) or {})
    seq_len = min(spec["seq_len"], context) if context else spec["seq_len"]
    held_out = heldout_windows(
        ctx.tokenizer, config.eval_data or config.data, seq_len=seq_len, num_windows=config.num_eval,
        text_column=config.text_column or getattr(ctx, "text_column", None), seed=ctx.seed,
    )
    return TaskData(task="lm", train={"input_ids": train}, eval={"input_ids": held_out})


# -- labelled files ---------------------------------------------------------------------------


def read_labelled_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a .tsv/.csv (first row = header) or .jsonl file -> (column names, rows)."""
    path = Path(path)
    if path.suffix not in LABELLED_SUFFIXES:
        raise DataError(
            f"`data` {str(path)!r}: classification needs a labelled file ending in "
            f"{', '.join(LABELLED_SUFFIXES)}, got {path.suffix!r}"
        )
    if not path.is_file():
        raise DataError(
            f"`data` {str(path)!r} does not exist; give a labelled .tsv/.csv/.jsonl file"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in handle if line.strip()]
            columns = list(rows[0]) if rows else []
        else:
            # GLUE .tsv files contain bare quotes inside sentences: no quoting for tabs.
            quoting = csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(
                handle, delimiter="\t" if path.suffix == ".tsv" else ",", quoting=quoting
            )
            rows, columns = list(reader), list(reader.fieldnames or [])
    return columns, [{k: str(v) for k, v in row.items() if k is not None} for row in rows]


def _pick_columns(config: TrainConfig, columns: list[str], path: str) -> tuple[str, str]:
    if config.label_column not in columns:
        raise DataError(
            f"`label_column` {config.label_column!r} is not in {path!r}; columns found: "
            f"{', '.join(columns) or '(none)'}; set `label_column` to one of them"
        )
    text_column = config.text_column
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMN_GUESSES if c in columns), None)
    if text_column not in columns:
        raise DataError(
            f"`text_column` {text_column!r} is not in {path!r}; columns found: {', '.join(columns)}; "
            "set `text_column` to one of them"
        )
    return text_column, config.label_column


def _load_examples(config: TrainConfig, path: str) -> list[tuple[str, str]]:
    columns, rows = read_labelled_rows(path)
    text_column, label_column = _pick_columns(config, columns, path)
    return [(row[text_column], row[label_column].strip()) for row in rows]


def split_examples(
    config: TrainConfig, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Shuffle, hold out `num_eval` rows (or read `eval_data`), then draw training rows (k-shot)."""
    examples = _load_examples(config, config.data)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = [examples[i] for i in order]
    if config.eval_data is None:
        held_out, pool = examples[: config.num_eval], examples[config.num_eval :]
    else:
        held_out, pool = _load_examples(config, config.eval_data)[: config.num_eval], examples
    if config.k_shot is not None:
        per_label: dict[str, list] = {}
        for example in pool:
            per_label.setdefault(example[1], []).append(example)
        pool = [ex for group in per_label.values() for ex in group[: config.k_shot]]
    if config.num_train is not None:
        pool = pool[: config.num_train]
    return pool, held_out


def _classification_data(config: TrainConfig, ctx, model: nn.Module | None) -> TaskData:
    seed = config.seed if config.seed is not None else ctx.seed
    train_rows, eval_rows = split_examples(config, seed)
    labels = _label_set(config, train_rows + eval_rows)
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = ctx.tokenizer
    label_ids = None
    if config.label_words is not None:
        label_ids = label_token_ids(
            tokenizer, config.prompt, [config.label_words[lab] for lab in labels]
        )
        prompts = [
            [config.prompt.replace("{text}", t) for t, _ in rows]
            for rows in (train_rows, eval_rows)
        ]
        train, held_out = (_encode(tokenizer, p, config.seq_len, keep_end=True) for p in prompts)
    else:
        if model is not None:
            attach_classification_head(model, len(labels))
        train, held_out = (
            _encode(tokenizer, [t for t, _ in rows], config.seq_len)
            for rows in (train_rows, eval_rows)
        )
    train["labels"] = torch.tensor([index[lab] for _, lab in train_rows], dtype=torch.long)
    held_out["labels"] = torch.tensor([index[lab] for _, lab in eval_rows], dtype=torch.long)
    return TaskData("classification", train, held_out, tuple(labels), label_ids)


def _label_set(config: TrainConfig, rows: list[tuple[str, str]]) -> list[str]:
    found = sorted({label for _, label in rows})
    if config.label_words is None:
        return found
    missing = [label for label in found if label not in config.label_words]
    if missing:
        raise DataError(
            f"labels {', '.join(map(repr, missing))} in `data` have no entry in `label_words` "
            f"(which maps {', '.join(map(repr, config.label_words))}); add a word for each label"
        )
    return list(config.label_words)


def label_token_ids(tokenizer, prompt: str, words: list[str]) -> Tensor:
    """(C,) id of the first token each label word adds after the prompt (as the model sees it)."""
    context = prompt.replace("{text}", "x")
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = []
    for word in words:
        full = tokenizer(f"{context} {word.strip()}", add_special_tokens=False)["input_ids"]
        diverge = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
        if diverge >= len(full):
            raise DataError(f"`label_words`: the word {word!r} adds no token after the prompt")
        ids.append(full[diverge])
    if len(set(ids)) != len(ids):
        raise DataError(
            f"`label_words` {words} start with the same token for this tokenizer; "
            "pick words whose first tokens differ"
        )
    return torch.tensor(ids, dtype=torch.long)


def _encode(tokenizer, texts: list[str], seq_len: int, keep_end: bool = False) -> dict[str, Tensor]:
    """Right-padded (N, T) ids + mask; `keep_end` truncates from the left (the prompt's end matters)."""
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    if keep_end:  # keep the first (BOS) token and the end of the prompt
        encoded = [
            ids if len(ids) <= seq_len else ids[:1] + ids[len(ids) - seq_len + 1 :]
            for ids in encoded
        ]
    else:
        encoded = [ids[:seq_len] for ids in encoded]
    width = max(len(ids) for ids in encoded) if encoded else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def attach_classification_head(model: nn.Module, num_labels: int) -> nn.Module | None:
    """Give a bare encoder a linear head on mean-pooled states; models with their own head keep it.

    Returns the head (added as `model.classification_head`), or None when none was needed.
    """
    if "ForSequenceClassification" in type(model).__name__:
        return None
    if "ForCausalLM" in type(model).__name__:
        raise DataError(
            "a causal LM has no classification head: set `label_words` (e.g. "
            '{"0": "bad", "1": "great"}) to train it with a prompt'
        )
    existing = getattr(model, HEAD_NAME, None)
    if isinstance(existing, nn.Linear) and existing.out_features == num_labels:
        return existing
    hidden = model.config.hidden_size
    head = nn.Linear(hidden, num_labels)
    param = next(model.parameters())
    model.add_module(HEAD_NAME, head.to(device=param.device, dtype=param.dtype))
    return head
