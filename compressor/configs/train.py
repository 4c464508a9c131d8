"""`TrainConfig`: the training settings shared by every fine-tuning stage.

Adapter stages (lora, nola, dsee, kappatune, welore LRC tuning) and the training stages
(backprop, mezo, sorted) all subclass it, so one set of keys means the same thing everywhere. A
base: it declares no method (the training loop is compressor/training/trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "mezo")
TASKS = ("lm", "classification")
PRECISIONS = ("no", "bf16", "fp16")
# Defaults when `lr` is left unset: AdamW's usual fine-tuning rate, and a MeZO rate measured to
# lower held-out perplexity of the embedded stories260K in the default 100 steps (3.993 -> 3.975
# and 3.972 for seeds 0 and 1; 1e-6, the MeZO paper's rate for billion-parameter OPT models, moved
# it by 0.0001 and 1e-3 diverged; tests/training/test_mezo_defaults.py). SPSA's noise grows with
# the parameter count, so larger models want the paper's {1e-6, 1e-7}: set `lr` for them.
DEFAULT_LR = {"adamw": 1e-4, "mezo": 1e-4}
# At a (fast) 1000 steps a second this is more than a day: a larger count is a typo, not a run.
MAX_STEPS = 100_000_000


@dataclass(frozen=True, kw_only=True)
class TrainConfig(MethodConfig):
    """Args:
    steps: optimizer steps. A backprop step consumes `grad_accum` micro-batches; a MeZO step
        runs two forward passes on one batch.
    lr: peak learning rate; None = the optimizer's default (adamw 1e-4; mezo 1e-4, tuned on the embedded
        stories260K; for models of billions of parameters the MeZO paper uses 1e-6 or 1e-7).
    batch_size: examples (classification) or token windows (lm) per micro-batch.
    seq_len: tokens per window (lm), or the truncation length of one example (classification).
    grad_accum: micro-batches whose gradients are summed before one AdamW update (backprop only).
    weight_decay: decoupled weight decay; never applied to biases or normalisation weights.
    warmup_steps: steps of linear warm-up from 0 to `lr`, before the schedule starts.
    schedule: "constant", "linear" (decay to 0 at `steps`) or "cosine" (to 0 at `steps`).
    optimizer: "adamw" (backpropagation) or "mezo" (zeroth-order SGD with forward passes only,
        memory about that of inference).
    mezo_eps: MeZO perturbation scale epsilon.
    max_grad_norm: clip the global gradient norm to this value (backprop); 0 = no clipping.
    data: training data. lm: "default" (embedded TinyStories), a .txt/.jsonl/.csv/.tsv file or a
        datasets name. classification: a .tsv/.csv/.jsonl file with a text and a label column.
    eval_data: held-out data; None = the held-out split of `data` (never a training row/window).
    task: "lm" (next-token loss on text windows) or "classification".
    text_column: column holding the text (classification); None = "text" or "sentence".
    label_column: column holding the label (classification).
    label_words: {label: word} for prompt-based classification of a causal LM: the loss is the
        cross entropy over the label words' logits at the last prompt position. None = the model
        must have a classification head (or one is added on top of a bare encoder).
    prompt: prompt template for `label_words`; "{text}" is replaced by the example's text.
    k_shot: training examples drawn per label (seeded); None = every training row.
    num_train: cap on training examples (classification) or windows (lm); None = all of them.
    num_eval: held-out examples (classification), or windows (lm) of 256 tokens: the first ones of the
        held-out half, as every evaluation scores them (compressor.protocol.PROTOCOL).
    eval_every: evaluate on the held-out data every N steps (curves["eval"]); 0 = only before
        and after training.
    checkpoint_every: save a resumable checkpoint to `<out>/checkpoints` every N steps; 0 = only
        when interrupted (Ctrl-C / SIGTERM; MeZO writes its (seed, gradient) log every step regardless).
    resume: a previous run's output folder (or its checkpoints folder) to continue from; the
        checkpoint must come from the same method and model.
    mixed_precision: "no", "bf16" or "fp16" autocast for the forward pass (backprop).
    seed: seed of the data order, MeZO's per-step seeds and any new weights; None = the run's seed.
    log_every: refresh the progress line every N steps.
    """

    steps: int = 100
    lr: float | None = None
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    optimizer: str = "adamw"
    mezo_eps: float = 1e-3
    max_grad_norm: float = 1.0
    data: str = "default"
    eval_data: str | None = None
    task: str = "lm"
    text_column: str | None = None
    label_column: str = "label"
    label_words: dict | None = None
    prompt: str = "{text} It was"
    k_shot: int | None = None
    num_train: int | None = None
    num_eval: int = 64
    eval_every: int = 0
    checkpoint_every: int = 0
    resume: str | None = None
    mixed_precision: str = "no"
    seed: int | None = None
    log_every: int = 10

    def __post_init__(self):
        super().__post_init__()
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("task", self.task, TASKS)
        _check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "num_eval", "log_every"):
            _check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            _check_nonnegative_int(name, getattr(self, name))
        if self.steps > MAX_STEPS:
            raise ConfigError(f"`steps` is {self.steps}, more than a run can finish (at most {MAX_STEPS:,}); "
                              "pass a realistic --steps, e.g. 1000")
        if self.seed is not None:
            _check_nonnegative_int("seed", self.seed)
        for name in ("k_shot", "num_train"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.lr is not None and not 0 < self.lr < float("inf"):
            raise ConfigError(
                f"`lr` must be > 0 and finite, got {self.lr}; e.g. lr=1e-4 (adamw or mezo on small models)"
            )
        if not self.mezo_eps > 0:
            raise ConfigError(
                f"`mezo_eps` must be > 0, got {self.mezo_eps}; the MeZO default is 1e-3"
            )
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                f"`weight_decay` and `max_grad_norm` must be >= 0, got {self.weight_decay} and "
                f"{self.max_grad_norm}; use 0 to turn either off"
            )
        self._check_labels()

    def _check_labels(self):
        if self.label_words is not None:
            if not isinstance(self.label_words, dict) or not self.label_words:
                raise ConfigError(
                    f"`label_words` must be a non-empty mapping label -> word, got {self.label_words!r}; "
                    'e.g. {"0": "bad", "1": "great"}'
                )
            if "{text}" not in self.prompt:
                raise ConfigError(
                    f"`prompt` must contain the placeholder {{text}}, got {self.prompt!r}; "
                    'e.g. "{text} It was"'
                )
            # Labels are compared as strings: files store "0"/"1" whatever YAML parsed.
            object.__setattr__(
                self, "label_words", {str(k): str(v) for k, v in self.label_words.items()}
            )

    @property
    def learning_rate(self) -> float:
        """`lr`, or the optimizer's default when it is unset."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"`{name}` must be an integer >= 1, got {value!r}")


def _check_nonnegative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"`{name}` must be an integer >= 0 (0 = off), got {value!r}")
