"""Load models from every place a user names them, and save checkpoints atomically.

MODEL may be: nothing (the embedded stories260K), a local HF folder, a compressor checkpoint
(a HF folder whose config.json carries `quantization_config.quant_method: compressor`, loaded by
transformers through compressor's quantizer; or an older folder with compression.json), a .gguf
file or a folder holding one, or a Hugging Face id (online, or offline from the local HF cache).
Remote code runs only with trust_remote_code=True.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dtypes import DTYPES, declared_dtype, dtype_name, gguf_dtype, parse_dtype  # noqa: F401  (re-exported)
from .errors import ConfigError, ModelError
from .offload import offload_kwargs
from .outdir import staged_output

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "stories260K"
log = logging.getLogger("compressor")
MANIFEST = "compression.json"  # format version 1; version 2 keeps the layer table in config.json
# Loads adapter folders (LoRA, NOLA, DSEE runs) as base + adapter; by name, because it imports the
# adapter modules, which import this one.
ADAPTER_LOADER = "compressor.adapter_folders"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str
    causal: bool
    manifest: dict[str, Any] | None = None
    source_dtype: torch.dtype = torch.float32  # what the source declares (checkpoints default to it)


def default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def load_model(source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
               load_in: str | None = None, max_memory: str | dict | None = None,
               offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load a model + tokenizer (see module docstring). Raises ModelError with the fix.

    `max_memory` ("0=20GiB,cpu=60GiB") and/or `offload_folder` load with accelerate's
    device_map="auto": what does not fit stays offloaded to CPU RAM or disk (compressor.offload)."""
    name = str(source) if source not in (None, "", "default") else "default"
    kwargs = _load_kwargs(parse_dtype(dtype), trust_remote_code, load_in)
    dispatch = offload_kwargs(max_memory, offload_folder)
    if dispatch and load_in is not None:
        raise ConfigError("`load_in` already places the model with device_map=auto; drop `max_memory`/"
                          "`offload_folder`, or drop `load_in`")
    kwargs.update(dispatch)
    with _quiet_transformers():
        if name == "default":
            loaded = _load_hf(DEFAULT_MODEL_DIR, {**kwargs, "trust_remote_code": False}, "default")
        else:
            loaded = _load_named(name, kwargs)
    if load_in is None and not dispatch:
        loaded.model.to(device)
    loaded.model.eval()
    return loaded


def _load_named(name: str, kwargs: dict[str, Any]) -> LoadedModel:
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"`{name}` is a file but not a .gguf; pass a model folder, a .gguf file or a model id")
        return _load_gguf(path.parent, path.name, kwargs, name)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return load_compressed(path, kwargs)
        if (path / "config.json").is_file():
            return _load_hf(path, kwargs, name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(path, ggufs[0].name, kwargs, name)
        adapters = importlib.import_module(ADAPTER_LOADER)
        if (adapter := adapters.find_adapter(path)) is not None:
            return adapters.load_adapter_folder(adapter, lambda base: _load_named(base, kwargs))
        raise ModelError(f"folder `{name}` is not a model (no config.json, compression.json, adapter_config.json "
                         "or single .gguf); pass a Hugging Face model folder, a .gguf file, an adapter folder or "
                         "a model id")
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or not HUB_ID.match(name):
        raise ModelError(f"model path `{name}` does not exist; check the path, or pass a Hugging Face id like "
                         "`HuggingFaceTB/SmolLM2-135M`")
    return _load_hf(name, kwargs, name)


def _load_kwargs(dtype: torch.dtype, trust_remote_code: bool, load_in: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in is not None:
        kwargs["quantization_config"] = quantization_config(load_in)
        kwargs["device_map"] = "auto"
    return kwargs


def quantization_config(load_in: str):
    """bitsandbytes 4/8-bit loading for a frozen base (QLoRA-style)."""
    if load_in not in ("4bit", "8bit"):
        raise ConfigError(f"`load_in` must be 4bit or 8bit, got {load_in!r}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError("`--load-in` needs bitsandbytes: pip install 'compressor[quant]'") from None
    if not torch.cuda.is_available():
        raise ModelError(f"`--load-in {load_in}` needs a CUDA GPU for bitsandbytes quantized weights, and none is "
                         "visible; drop `--load-in` to train in full precision on this machine")
    if load_in == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_causal_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return bool(getattr(config, "is_decoder", False)) or config.model_type in {"llama", "gpt2", "mistral", "qwen2",
                                                                              "phi3", "gemma", "opt", "gpt_neox"}


def require_causal_lm(model, method: str, why: str) -> None:
    """One-line ConfigError, before any work, when `method` needs next-token logits (`why`) and
    `model` is not a causal LM (an encoder has no LM head: its output has no `.logits`)."""
    config = getattr(model, "config", None)
    if config is None or not is_causal_config(config):
        kind = getattr(config, "model_type", None) or type(model).__name__
        raise ConfigError(f"{method}: {why} needs a causal LM, and `{kind}` is not one; "
                          "use a data-free or calibration-only method (svd, svd-llm, saes-svd, prune) for encoders")


def _auto_class(config):
    """The class the checkpoint was saved from (e.g. BartForConditionalGeneration, not BartModel)
    when transformers has it, else the causal-LM or bare auto class."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    named = getattr(transformers, archs[0], None) if archs else None
    if named is not None and getattr(named, "config_class", None) is type(config):
        return named
    return AutoModelForCausalLM if is_causal_config(config) else AutoModel


def _load_hf(where: str | Path, kwargs: dict[str, Any], source: str) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=kwargs["trust_remote_code"])
        if Path(where).is_dir():
            check_local_folder(Path(where), config)
        # Shapes are compared by us (one line naming the tensor); bitsandbytes stores packed shapes.
        mismatched = {"ignore_mismatched_sizes": True} if "quantization_config" not in kwargs else {}
        model, info = _auto_class(config).from_pretrained(where, output_loading_info=True, **mismatched, **kwargs)
        tokenizer: Any = MissingTokenizer(source)
        if not _local_without_tokenizer(where):
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=kwargs["trust_remote_code"])
    except (OSError, ValueError) as err:
        raise ModelError(_hub_hint(source, err)) from None
    check_loading_info(info, source, model)
    return LoadedModel(model, tokenizer, source, is_causal_config(config), source_dtype=declared_dtype(config))


def check_loading_info(info: dict[str, Any], source: str, model: nn.Module) -> None:
    """ModelError naming the first weight transformers reported missing, unexpected or of another
    shape (it only warns, and fills missing weights with fresh or uninitialised values).

    One exception: a whole top-level module the class adds and the weights lack entirely (BERT's
    pooler of a checkpoint saved without one, a new classification head) is initialised fresh, as
    transformers does for any new head, with a warning; the output embeddings never are."""
    info = {**info, "missing_keys": _missing_that_matter(sorted(info.get("missing_keys") or []), source, model)}
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, wanted = mismatched[0]
        raise ModelError(f"model `{source}`: tensor `{key}` has shape {list(stored)} in the weights but "
                         f"{list(wanted)} in config.json; the weights do not match their config, re-create or "
                         "re-download the model")
    for kind, why in (("missing_keys", "is missing from the weights"),
                      ("unexpected_keys", "is in the weights but not in the model config.json describes")):
        keys = sorted(info.get(kind) or [])
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ModelError(f"model `{source}`: tensor `{keys[0]}`{more} {why}; the folder is incomplete or "
                             "damaged, re-create or re-download it")


def _missing_that_matter(missing: list[str], source: str, model: nn.Module) -> list[str]:
    loaded_tops = {key.split(".")[0] for key in model.state_dict() if key not in set(missing)}
    head = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
    head_names = {name for name, param in model.named_parameters(remove_duplicate=False) if param is head}
    fresh = [key for key in missing if key.split(".")[0] not in loaded_tops and key not in head_names]
    if fresh:
        log.warning("model `%s`: %s not in the weights; initialised fresh (a module the class adds)", source,
                    ", ".join(sorted({key.rsplit(".", 1)[0] for key in fresh})))
    return [key for key in missing if key not in fresh]


class MissingTokenizer:
    """Stands in for the tokenizer of a local folder that has none: the model itself loads
    (compressor.load), and anything that needs text fails with a one-line error that says so."""

    def __init__(self, source: str):
        self.source = source

    def __getattr__(self, name: str):
        raise ModelError(f"model `{self.source}` has no tokenizer (no tokenizer.json / tokenizer_config.json); "
                         "copy the tokenizer files of the model it came from into that folder")

    def __call__(self, *args: Any, **kwargs: Any):
        return self.__getattr__("__call__")


def check_local_folder(folder: Path, config) -> None:
    """Before any weight is allocated: a compressed checkpoint's layer table must fit the
    architecture (a meta-device model) and the tensors its safetensors files hold (names and
    shapes, read from their headers)."""
    from .ckpt_format import QUANT_METHOD, check_layer_table, check_stored_tensors, check_version, stored_shapes

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers names what is wrong with config.json
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qc, dict) or ("layers" not in qc and "format_version" not in qc):
        return
    where = f"checkpoint `{folder}`"
    if qc.get("quant_method") != QUANT_METHOD:
        raise ModelError(f"{where}: config.json's quantization_config holds compressor's layer table but "
                         f"`quant_method` is {qc.get('quant_method')!r}; set it back to \"{QUANT_METHOD}\"")
    check_version(qc.get("format_version"), where)
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise ModelError(f"{where}: `quantization_config.layers` must be a mapping of module names, got "
                         f"{type(layers).__name__}; the checkpoint is damaged, re-create it")
    with torch.device("meta"):
        check_layer_table(_from_config(config), layers, where)
    check_stored_tensors(layers, stored_shapes(folder), where)


def _local_without_tokenizer(where: str | Path) -> bool:
    """A local folder with no tokenizer file (e.g. a checkpoint saved without one): load it bare."""
    path = Path(where)
    names = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
    return path.is_dir() and not any((path / n).exists() for n in names)


def _from_config(config, **kwargs: Any) -> nn.Module:
    """A freshly initialised model of `config`'s class (auto classes and concrete ones build differently)."""
    cls = _auto_class(config)
    return (cls.from_config if hasattr(cls, "from_config") else cls._from_config)(config, **kwargs)


def _hub_hint(source: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if "trust_remote_code" in str(err):
        return f"model `{source}` needs custom code: pass --trust-remote-code if you trust it ({first})"
    return (f"could not load model `{source}` ({first}); check the id/path, your connection, or the local "
            "Hugging Face cache (HF_HUB_OFFLINE=1 uses it)")


def _load_gguf(folder: Path, filename: str, kwargs: dict[str, Any], source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    except ImportError as err:
        raise ModelError(f"reading GGUF needs the gguf package ({err}); pip install 'compressor[gguf]'") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"could not read GGUF `{folder / filename}`: {str(err).splitlines()[0][:200]}") from None
    # GGUF weights are dequantized to float on load; drop the marker so save_pretrained works.
    _strip_quantization(model)
    return LoadedModel(model, tokenizer, source, True, source_dtype=gguf_dtype(folder / filename))


def _strip_quantization(model: nn.Module) -> None:
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    with contextlib.suppress(AttributeError):
        model.is_quantized = False


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints load progress bars and advisory warnings; keep the CLI output clean."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Compressed checkpoints


def load_compressed(folder: Path, kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Rebuild a compressor checkpoint: same HF class, compressed layers swapped in, weights loaded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from .layers import build_layer, link_quantized_embeddings
    from .targeting import replace_module

    kwargs = kwargs or {}
    if "device_map" in kwargs:
        raise ConfigError(f"`{folder}` is a compressor checkpoint, which loads whole: drop `max_memory`/"
                          "`offload_folder` (offloaded loading reads Hugging Face folders, ids and GGUF)")
    from .ckpt_format import check_layer_table, check_stored_tensors, stored_shapes

    manifest = json.loads((folder / MANIFEST).read_text())
    config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    where = f"checkpoint `{folder}` ({MANIFEST})"
    layers = manifest.get("layers", {}) if isinstance(manifest, dict) else None
    with torch.device("meta"):  # the table is checked against the architecture before anything is allocated
        check_layer_table(_from_config(config), layers, where)
    check_stored_tensors(layers, stored_shapes(folder), where, placeholders=False)
    model = _from_config(config, dtype=kwargs.get("dtype", torch.float32))
    for name, spec in layers.items():
        replace_module(model, name, build_layer(spec))
    link_quantized_embeddings(model)
    state = {}
    # Only the model's own shards: users sometimes drop other .safetensors files beside them.
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise ModelError(f"checkpoint `{folder}` has no .safetensors weights")
    _check_shapes(model, state, folder)
    result = model.load_state_dict(state, strict=False)
    _check_missing(model, result.missing_keys, result.unexpected_keys, folder)
    model.to(kwargs.get("dtype", torch.float32))
    tokenizer = (AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists()
                 else MissingTokenizer(str(folder)))
    return LoadedModel(model, tokenizer, str(folder), is_causal_config(config), manifest, declared_dtype(config))


def _check_missing(model: nn.Module, missing: list[str], unexpected: list[str], folder: Path) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # Tied weights (lm_head, GPT-NeoX's embed_out, BART/T5 encoder/decoder embeddings) are stored
    # once: a missing name is fine when its tensor is one that was loaded under another name.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for n, p in params.items() if n not in set(missing)}
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers and not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        key, what = (missing[0], "is missing from the weights") if missing else (unexpected[0], "is not in the model")
        raise ModelError(f"checkpoint `{folder}`: tensor `{key}` {what} (missing {len(missing)}, unexpected "
                         f"{len(unexpected)}); the checkpoint does not match its compression.json, re-create it")


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise ModelError(f"checkpoint `{folder}`: tensor `{key}` has shape {list(tensor.shape)}, the model "
                             f"needs {list(own[key].shape)}; the checkpoint is damaged, re-create it")


def save_checkpoint(model: nn.Module, tokenizer, folder: Path, manifest: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer) into `folder`, floats in `dtype`.

    With compressed layers, config.json carries the layer table as `quantization_config`
    (compressor.ckpt_format) and each layer without a dense weight gets an empty placeholder.
    `manifest`: run metadata stored beside the layer table. The in-memory model is not changed.
    """
    from .ckpt_format import placeholder_names, quantization_config
    from .layers import compressed_layers, layer_manifest

    folder.mkdir(parents=True, exist_ok=True)
    _strip_quantization(model)
    layers = compressed_layers(model)
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    state = cast_state_dict(model, dtype)
    state.update({key: torch.zeros(0, dtype=dtype) for key in placeholder_names(layers)})
    with _quiet_transformers():
        model.save_pretrained(folder, state_dict=state)
        if tokenizer is not None and not isinstance(tokenizer, MissingTokenizer):
            tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = dtype_name(dtype)
    if layers:
        metadata = {"base_class": type(model).__name__, **(manifest or {})}
        config["quantization_config"] = quantization_config(layer_manifest(model), metadata)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in `dtype`; tensors shared in memory (tied embeddings)
    stay shared, so save_pretrained still writes them once. Integer buffers keep their dtype."""
    cast: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            state[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        state[name] = cast[key]
    return state


def cast_safetensors_file(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a .safetensors file (an adapter) with its floating tensors in `dtype`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's layer table + metadata: config.json's quantization_config (format 2) or
    compression.json (format 1); None for a plain model folder."""
    from .ckpt_format import is_compressed_config

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return json.loads((folder / MANIFEST).read_text())
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return config["quantization_config"] if is_compressed_config(config) else None


def save(model: nn.Module, folder: str | os.PathLike, tokenizer=None, manifest: dict[str, Any] | None = None,
         *, overwrite: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Public API: save a (compressed) model atomically; reload with compressor.load(folder) or, once
    compressor is imported, transformers' from_pretrained(folder). `dtype` None = the model's own.
    `folder` follows the output-folder contract of compressor.outdir (`overwrite` replaces a
    folder this function or the CLI wrote before)."""
    folder = Path(folder)
    with staged_output(folder, overwrite=overwrite, command="save") as tmp:
        save_checkpoint(model, tokenizer, tmp, manifest, parse_dtype(dtype) if dtype is not None else None)
    return folder


def load(folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str = "float32") -> nn.Module:
    """Public API: load any model MODEL accepts (compressed checkpoints included); returns the model."""
    return load_model(str(folder), device=device, dtype=dtype).model


logging.getLogger("transformers").setLevel(logging.ERROR)
# bitsandbytes (imported by peft) logs on CPU that its optional CPU kernel from Hugging Face's
# kernels hub did not load; nothing uses it here, and the line reads like a failure.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
