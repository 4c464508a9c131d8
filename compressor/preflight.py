"""Checks that run before a model loads: devices, numeric flags, windows against the model's context.

Each raises ConfigError (one line, the bad value and the fix), so a typo fails in a second
instead of after minutes of loading or calibration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .config import CalibrationConfig
from .errors import ConfigError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
INT64_MAX = 2**63 - 1


def check_device(name: str) -> None:
    """`auto`, `cpu`, `cuda`, `cuda:N` of a visible GPU, `mps` when present; anything else is refused."""
    if str(name) == "auto":  # resolved later to CUDA when available, else the CPU
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"`--device {name}` is not a device; use cpu, cuda, cuda:0, ... or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"`--device {name}`: no CUDA GPU is visible on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"`--device {name}`: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"`--device {name}`: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"`--device {name}`: device type `{device.type}` is not supported; use cpu, cuda or mps")


def check_max_memory(parsed: dict) -> None:
    """Every GPU index named in `max_memory` must be visible."""
    import torch

    gpus = [k for k in parsed if isinstance(k, int)]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [k for k in gpus if k >= count]
    if missing:
        visible = f"GPUs 0..{count - 1}" if count else "no GPU"
        raise ConfigError(f"`max_memory` names GPU {missing[0]} but this machine has {visible}; "
                          "name only visible devices, e.g. `cpu=60GiB`")


def check_int(name: str, value: int | None, minimum: int) -> None:
    """`value` (when given) must be an integer in [minimum, 2**63)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def model_context(source: str | None) -> int | None:
    """Longest sequence the model's config allows, read from a local config.json (no download);
    None when not known before loading."""
    from .models import DEFAULT_MODEL_DIR

    folder = DEFAULT_MODEL_DIR if source in (None, "", "default") else Path(os.path.expanduser(str(source)))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return context_of(config)


def context_of(config) -> int | None:
    """The context length of a model config (a dict or a transformers PretrainedConfig)."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    for key in CONTEXT_KEYS:
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_lens(seq_lens: Iterable[tuple[str, int | None]], context: int | None) -> None:
    """Each (name, seq_len) must fit the model's context: longer windows silently degrade."""
    if context is None:
        return
    for name, seq_len in seq_lens:
        if isinstance(seq_len, int) and seq_len > context:
            raise ConfigError(f"`{name}` is {seq_len} but the model's context is {context} tokens "
                              f"(max_position_embeddings); use at most {context}")


def check_flags(device: str, ints: dict[str, int | None], *, minimum: int = 1, seq_len: int | None = None,
                model: str | None = None) -> None:
    """The CLI's numeric flags and device, and `seq_len` against a local model's context."""
    check_device(device)
    for name, value in ints.items():
        check_int(name, value, minimum)
    if seq_len is not None:
        check_seq_lens([("--seq-len", seq_len)], model_context(model))


def check_supported(stages, model, causal: bool, evaluate: bool) -> None:
    """Refuse, before any work, what this architecture cannot do: evaluating or calibrating an
    encoder-decoder (its blocks need decoder inputs), or next-token fine-tuning of a non-causal model."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) or type(model).__name__
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder and evaluate:
        raise ConfigError(f"evaluating encoder-decoder models (`{kind}`) is not supported; turn evaluation off "
                          "with `--set evaluate=false` (recipe: `evaluate: false`)")
    for index, stage in enumerate(stages):
        fields = stage.fields
        where = f"stages[{index}] ({stage.name})"
        if encoder_decoder and isinstance(stage.config, CalibrationConfig):
            raise ConfigError(f"{where}: calibrated methods do not support encoder-decoder models (`{kind}`) yet; "
                              "use the data-free `svd`, or `analyze`")
        if kind in ("t5", "mt5", "umt5") and stage.kind == "compress" and _targets_t5_wo(model, fields):
            raise ConfigError(f"{where}: T5's feed-forward reads `wo.weight` directly, which a compressed layer does "
                              "not have; add `--ignore wo` (recipe: `ignore: [wo]`)")
        tied = _tied_targets(model, fields) if stage.kind == "compress" else []
        if tied:
            raise ConfigError(f"{where}: `{tied[0]}` shares its weight with the input embeddings (tied "
                              "embeddings), so it cannot be compressed alone; drop it from --targets (or untie "
                              "the embeddings in the model first: tie_word_embeddings=false)")
        if fields.get("task") == "lm" and not causal:
            raise ConfigError(f"{where}: `task: lm` (next-token loss) needs a causal LM, and `{kind}` is not one; "
                              "use `--set task=classification` with labelled data")


def _tied_targets(model, fields: dict) -> list[str]:
    """Targeted linears whose weight is the input embedding matrix (tied lm_head)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    shared = getattr(embedding, "weight", None)
    if shared is None or not fields.get("targets"):
        return []  # lm_head and embeddings are only compressed when named
    from .targeting import select_linears

    try:
        chosen = select_linears(model, tuple(fields.get("targets") or ()), tuple(fields.get("ignore") or ()))
    except ConfigError:
        return []
    return [name for name, module in chosen.items() if getattr(module, "weight", None) is shared]


def _targets_t5_wo(model, fields: dict) -> bool:
    from .targeting import select_linears

    try:
        chosen = select_linears(model, tuple(fields.get("targets") or ()), tuple(fields.get("ignore") or ()))
    except ConfigError:
        return False  # the stage reports its own targeting error
    return any(name.rsplit(".", 1)[-1] == "wo" for name in chosen)
