"""The method registry: one `register()` call fills a by-name (YAML/CLI) and a by-config-type
(Python API) lookup, as PEFT and torchao do respectively.

`BUILTIN` names every built-in method's module, config class, kind and summary without importing
it, so `compressor methods` and `--help` answer without loading torch; `get_method` imports only
the module it needs. tests/test_registry_table.py checks the table against what importing the
modules registers, so it cannot drift.

A method's capabilities follow from its entry and its config, never from a list elsewhere:
its kind says which command runs it and whether it runs offloaded (`MethodInfo.offloadable`);
`FLAG_FIELDS` maps the commands' flags onto config fields (`fields_from_flags`), so a flag
applies to every method whose config has the field; a calibrated method's config extends
`config.CalibrationConfig` and states its calibration defaults once, as class keywords. Adding a
method is its module plus its line in `BUILTIN` (tests/test_add_method.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .config import MethodConfig, did_you_mean
from .errors import ConfigError
from .report.records import StageResult

Kind = Literal["analyze", "compress", "finetune", "transform"]
# Kinds whose stages run under accelerate offload (`max_memory` / `offload_folder`): they read
# weights through the calibration engine, which materialises offloaded ones block by block.
OFFLOADABLE_KINDS = ("analyze", "compress")

# CLI flag -> the config fields it fills, first one the method has wins. Any other flag fills the
# field of its own name (`--from-trained` -> `from_trained`), so a new method's fields get the
# commands' flags without an entry here.
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "calib": ("calibration",),
    "calib-windows": ("num_windows",),
    "eval-windows": ("num_eval",),
    "r": ("r", "lora_r"),
    "reduction": ("welore_reduction",),
}


@dataclass(frozen=True)
class MethodInfo:
    """What is known about a method before its module is imported. Its capabilities follow from
    these and from its config's fields: which CLI flags fill it (`FLAG_FIELDS`), whether it
    calibrates (its config extends `CalibrationConfig`, whose class keywords give its defaults)."""

    module: str
    config_class: str
    kind: str
    summary: str

    @property
    def offloadable(self) -> bool:
        return self.kind in OFFLOADABLE_KINDS


BUILTIN: dict[str, MethodInfo] = {
    "analyze": MethodInfo(
        "compressor.analysis.analyze", "AnalyzeConfig", "analyze",
        "`analyze`: one SVD sweep over the selected linears — spectra, κ (KappaTune), effective and stable rank, "
        "WeLore's normalised tail, the ranks WeLore would remove and its LRC/N-LRC verdict."),
    "asvd": MethodInfo(
        "compressor.methods.asvd", "ASVDConfig", "compress",
        "ASVD: activation-aware SVD — scale input channels by their typical magnitude before truncating."),
    "backprop": MethodInfo(
        "compressor.training.backprop", "BackpropConfig", "finetune",
        "Backprop fine-tuning: the `backprop` stage, full fine-tuning of the selected weights with AdamW "
        "through `fit` (training/trainer.py)."),
    "dsee": MethodInfo(
        "compressor.adapters.dsee", "DseeConfig", "finetune",
        "DSEE: dually sparsity-embedded efficient tuning (Chen et al., ACL 2023, arXiv 2111.00160; reference "
        "code VITA-Group/DSEE)."),
    "dsformer": MethodInfo(
        "compressor.methods.dsformer", "DSFormerConfig", "compress",
        "dsformer: dense x sparse factorization W ~ D S (N:M-sparse S), refined by straight-through training."),
    "kappatune": MethodInfo(
        "compressor.adapters.kappatune", "KappaTuneConfig", "finetune",
        "KappaTune: fine-tune only the best-conditioned tensors (O. Ludwig, arXiv 2506.16289; peft's "
        "KappaTuneSelector)."),
    "lora": MethodInfo(
        "compressor.adapters.lora", "LoraConfig", "finetune",
        "LoRA through Hugging Face peft (Hu et al., arXiv 2106.09685): y = W₀x + (α/r)·B A x with A (r, in) "
        "Kaiming-uniform and B (out, r) zero, so the model is unchanged at step 0."),
    "maestro": MethodInfo(
        "compressor.methods.maestro", "MaestroConfig", "compress",
        "maestro: trainable low-rank factors with ordered dropout; learned ranks, truncatable to any budget."),
    "mezo": MethodInfo(
        "compressor.training.mezo", "MezoConfig", "finetune",
        "MeZO: memory-efficient zeroth-order SGD (SPSA with the seed trick)."),
    "nola": MethodInfo(
        "compressor.adapters.nola", "NolaConfig", "finetune",
        "NOLA: LoRA factors as linear combinations of frozen random bases (Koohpayegani et al., ICLR 2024, "
        "arXiv 2310.02556; reference code UCDvision/NOLA)."),
    "prune": MethodInfo(
        "compressor.methods.prune", "PruneConfig", "compress",
        "prune: N:M (default 2:4) or unstructured pruning by magnitude, Wanda or SparseGPT."),
    "saes-svd": MethodInfo(
        "compressor.methods.saes_svd", "SAESConfig", "compress",
        "SAES-SVD: CEALC (cumulative-error-aware closed form) + ACES (per-layer β search)."),
    "sorted": MethodInfo(
        "compressor.training.sorted_ft", "SortedConfig", "finetune",
        "Sorted Fine-Tuning (SoFT / Sorted LLaMA): train every depth sub-model at once. arXiv 2309.08968."),
    "svd": MethodInfo(
        "compressor.methods.svd", "SVDConfig", "compress",
        "Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, the data-free baseline of the low-rank family."),
    "svd-llm": MethodInfo(
        "compressor.methods.svd_llm", "SVDLLMConfig", "compress",
        "SVD-LLM: truncation-aware data whitening (+ optional least-squares update of U)."),
    "welore": MethodInfo(
        "compressor.methods.welore", "WeLoreConfig", "compress",
        "WeLore: non-uniform ranks from each matrix's normalised singular-value tail."),
    "heal": MethodInfo(
        "compressor.adapters.heal", "HealConfig", "finetune",
        "`heal`: train only the compressed parameters of a compressed model, after compression."),
    "welore-tune": MethodInfo(
        "compressor.adapters.welore_tune", "WeLoreTuneConfig", "finetune",
        "WeLore LRC tuning (Jaiswal et al., arXiv 2407.11239): after WeLore compression, train only the "
        "low-rank components' factors U', V' (`LowRankLinear.u`, `.v`)."),
}


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[..., StageResult]
    kind: str
    summary: str


_BY_NAME: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}


def summary_of(docstring: str | None) -> str:
    """The first sentence of a docstring's first paragraph; full stops inside brackets
    ("(O. Ludwig, ...)") and before a lower-case word ("once. arXiv") do not end it."""
    text = " ".join((docstring or "").strip().split("\n\n")[0].split())
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char in ".!?" and depth == 0 and text[i + 1:i + 2] == " " and text[i + 2:i + 3].isupper():
            return text[:i + 1]
    return text


def register(name: str, config_cls: type[MethodConfig], *, kind: Kind):
    """Decorator registering `apply(model, config, ctx) -> StageResult` under `name`."""

    def decorator(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
        if name in _BY_NAME:
            raise KeyError(f"method `{name}` registered twice ({_BY_NAME[name].apply.__module__}, {fn.__module__})")
        doc = fn.__module__ and importlib.import_module(fn.__module__).__doc__
        method = Method(name, config_cls, fn, kind, summary_of(doc))
        _BY_NAME[name] = method
        _BY_CONFIG[config_cls] = method
        config_cls.method_name = name
        return fn

    return decorator


def load_builtin_methods() -> None:
    """Import every built-in method's module by name (the plugin pattern: the registry names its
    plugins in BUILTIN and imports none of them statically, so no method module is below it)."""
    for info in BUILTIN.values():
        importlib.import_module(info.module)


def get_method(name: str) -> Method:
    if name not in _BY_NAME and name in BUILTIN:
        importlib.import_module(BUILTIN[name].module)  # registers it (and whatever it imports)
    if name not in _BY_NAME:
        names = method_names()
        raise ConfigError(
            f"unknown method `{name}`{did_you_mean(name, names)} (available: {', '.join(names)}); "
            "see `compressor methods`"
        )
    return _BY_NAME[name]


def method_info(name: str) -> MethodInfo:
    """A method's module, config class, kind and summary, importing nothing for built-ins."""
    if name in BUILTIN:
        return BUILTIN[name]
    method = get_method(name)
    return MethodInfo(method.apply.__module__, method.config_cls.__name__, method.kind, method.summary)


def method_names(kind: str | None = None) -> list[str]:
    """Built-in and user-registered method names (of one kind), without importing the built-ins."""
    kinds = {name: info.kind for name, info in BUILTIN.items()}
    kinds.update({name: method.kind for name, method in _BY_NAME.items()})
    return sorted(n for n, k in kinds.items() if kind is None or k == kind)


def method_for_config(config: MethodConfig) -> Method:
    load_builtin_methods()
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered method config") from None


def apply_(model, config: MethodConfig, ctx=None) -> StageResult:
    """Apply one configured method to `model` in place (Python API)."""
    from .context import Context

    method = method_for_config(config)
    return method.apply(model, config, ctx or Context.for_model(model))


def flag_field(flag: str, fields: list[str]) -> str | None:
    """The config field a CLI flag fills among `fields`, or None when the method has none."""
    return next((f for f in FLAG_FIELDS.get(flag, (flag.replace("-", "_"),)) if f in fields), None)


def fields_from_flags(name: str, flags: dict[str, Any]) -> dict[str, Any]:
    """{field: value} for the flags given (None = not given); a flag the method lacks is an error,
    naming the flag that replaced it when its field was renamed."""
    config_cls = get_method(name).config_cls
    fields = config_cls.field_names()
    chosen = {}
    for flag, value in flags.items():
        if value is None:
            continue
        key = flag_field(flag, fields)
        if key is None:
            raise ConfigError(_foreign_flag(name, flag, config_cls))
        chosen[key] = value
    return chosen


def _foreign_flag(name: str, flag: str, config_cls: type[MethodConfig]) -> str:
    old = FLAG_FIELDS.get(flag, (flag.replace("-", "_"),))
    renamed = next((config_cls.renamed[f] for f in old if f in config_cls.renamed), None)
    if renamed:
        new, _, why = renamed.partition(" ")
        return f"{name}: `--{flag}` was renamed `--{new.replace('_', '-')}`" + (f" {why}" if why else "")
    return (f"`--{flag}` does not apply to method `{name}` (its fields: {', '.join(config_cls.field_names())}); "
            "use --set key=value for method-specific fields")
