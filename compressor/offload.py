"""Models bigger than the device: accelerate's CPU/disk offload, seen from the compression loop.

`load_model(..., max_memory=..., offload_folder=...)` loads with `device_map="auto"`: accelerate
keeps what fits on the accelerator, and the rest as `meta` parameters whose real values live in
CPU RAM or in `offload_folder` on disk; a hook on each offloaded module loads its weights onto the
execution device for the duration of its forward and drops them again. Block-by-block calibration
already only needs one block at a time, so it runs unchanged on such a model as long as it

* reads a linear's weight through `materialized(module)` (a meta tensor has no values),
* never `.to()`s a dispatched block (the hooks own placement),
* copies a block for the teacher stream with `standalone_copy` (a plain deepcopy would also copy
  the hook's weights map, which for CPU offload is the whole model's state dict), and
* places a new compressed layer with `place_like` (offloaded again when its source was, so the
  factors of a model bigger than the device do not pile up on the device).

Every function here is a no-op pass-through on an ordinary (non-dispatched) model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .errors import ConfigError


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate hooks manage the placement of (part of) `model`."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def has_offloaded_weights(module: nn.Module) -> bool:
    """True when `module`'s own parameters are offloaded (meta at rest, loaded by its hook)."""
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) and any(
        p.device.type == "meta" for p in module.parameters(recurse=False)
    )


def execution_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Where `module`'s forward runs: its hook's execution device, else its parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device(default)


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """While active, every offloaded parameter in `module` (recursively) holds its real value on
    its execution device; on exit they are offloaded again."""
    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            stack.enter_context(materialized_own(sub))
        yield module


def standalone_copy(block: nn.Module) -> nn.Module:
    """A hook-free deep copy of `block` holding real weights (on their execution devices)."""
    hooked = [m for m in block.modules() if hasattr(m, "_hf_hook")]
    if not hooked:
        return copy.deepcopy(block)
    # Map every hook to None in deepcopy's memo so the copy shares nothing with the hook state.
    memo = {id(m._hf_hook): None for m in hooked}
    with materialized(block):
        clone = copy.deepcopy(block, memo)
    for sub in clone.modules():
        for attr in ("_hf_hook", "_old_forward", "forward"):
            sub.__dict__.pop(attr, None)  # back to the class's own forward
    return clone


def place_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Put `new` (which replaces `old`) where `old` lived: offloaded to CPU with a loading hook
    when `old` was offloaded and runs on an accelerator, else on `old`'s execution device."""
    device = execution_device(old)
    if has_offloaded_weights(old) and device.type != "cpu":
        return offload_to_cpu(new, device)
    return new.to(device)


def offload_to_cpu(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Keep `module`'s weights in CPU RAM (meta on the module) and load them onto `device` for
    each forward: the same single hook accelerate puts on an offloaded leaf module."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    module.to("cpu")
    return add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True, place_submodules=True))


def offload_kwargs(max_memory: str | dict | None, offload_folder: str | None) -> dict:
    """from_pretrained keywords for offloaded loading ({} when neither option is given)."""
    if max_memory is None and offload_folder is None:
        return {}
    kwargs: dict = {"device_map": "auto"}
    if max_memory is not None:
        kwargs["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def parse_max_memory(spec: str | dict) -> dict:
    """`"0=20GiB,cpu=60GiB"` (or a mapping) -> {0: "20GiB", "cpu": "60GiB"} for accelerate."""
    if isinstance(spec, dict):
        items = spec.items()
    else:
        try:
            items = [part.split("=", 1) for part in str(spec).split(",") if part.strip()]
            items = [(k.strip(), v.strip()) for k, v in items]
        except ValueError:
            items = []
        if not items:
            raise ConfigError(
                f"`max_memory` {spec!r} is not DEVICE=SIZE[,DEVICE=SIZE]; e.g. `0=20GiB,cpu=60GiB`"
            )
    parsed = {}
    for key, value in items:
        key = str(key).removeprefix("cuda:")
        parsed[int(key) if key.isdigit() else key] = value
    for key in parsed:
        if not isinstance(key, int) and key not in ("cpu", "mps", "disk"):
            raise ConfigError(
                f"`max_memory` device {key!r} is not a GPU index, `cpu` or `mps`; e.g. `0=20GiB,cpu=60GiB`"
            )
    return parsed


class MaterializedWeights(Mapping):
    """{name: W (out, in)} read lazily from linears, one at a time, offloaded ones included; so a
    whole-model pass (e.g. WeLore's spectra) holds one weight in memory, not all of them."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears

    def __getitem__(self, name: str) -> torch.Tensor:
        from .targeting import linear_weight

        module = self.linears[name]
        with materialized(module):
            return linear_weight(module).detach()

    def __iter__(self):
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)


def gather_to_cpu(model: nn.Module) -> nn.Module:
    """Every weight of a dispatched `model` back as ordinary CPU tensors, hooks removed, tied
    weights tied again: what saving and merging need. One module at a time, so the device never
    holds more than before; the (compressed) model must fit in CPU RAM."""
    if not is_dispatched(model):
        return model
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        offloaded = {}
        if has_offloaded_weights(module):
            names = [n for n, _ in module.named_parameters(recurse=False)]
            names += [n for n, b in module.named_buffers(recurse=False) if b.device.type == "meta"]
            offloaded = {n: hook.weights_map[n] for n in names if n in hook.weights_map}
        remove_hook_from_module(module)
        for name, value in offloaded.items():
            set_module_tensor_to_device(module, name, "cpu", value=value)
    _retie_embeddings(model)
    model.to("cpu")
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map  # saving must not treat the model as dispatched any more
    return model


def _retie_embeddings(model: nn.Module) -> None:
    """Tie lm_head to the input embedding again where the config asks for it: every load by a
    hook gives a module new parameter objects, so the two no longer share one (and saving would
    write both). Only a plain linear lm_head still holding the embedding's values is tied."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    try:
        output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if type(output) is nn.Linear and embeddings is not None and output.weight is not embeddings.weight \
            and output.weight.shape == embeddings.weight.shape and torch.equal(output.weight, embeddings.weight):
        output.weight = embeddings.weight


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of parameters holding NaN or Inf, offloaded ones read one module at a time."""
    bad = []
    for prefix, module in model.named_modules():
        with materialized_own(module):
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point() and not torch.isfinite(param).all():
                    bad.append(f"{prefix}.{name}" if prefix else name)
    return bad


@contextlib.contextmanager
def materialized_own(module: nn.Module) -> Iterator[nn.Module]:
    """Like `materialized`, for `module`'s own parameters only (not its children's)."""
    if not has_offloaded_weights(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def check_offload_ready(methods: Mapping) -> None:
    """Refuse, before loading, a pipeline with a stage that cannot run offloaded. `methods` maps
    each stage's method name to its registry MethodInfo, whose `offloadable` says so: analyze and
    compress methods read weights through this module and the calibration engine, which hands each
    per-layer step real weights and places what it returns; fine-tuning trains the whole model."""
    refused = [f"{name} ({info.kind})" for name, info in methods.items() if not info.offloadable]
    if refused:
        raise ConfigError(
            f"`max_memory`/`offload_folder` (accelerate offload) runs analyze and compress stages, "
            f"not {', '.join(refused)}; drop the offload options or run those stages on a model that fits"
        )


def input_device(model: nn.Module) -> torch.device:
    """Where token ids should go: the input embedding's execution device (meta-safe)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or no embeddings
        embeddings = None
    return execution_device(embeddings if embeddings is not None else model)
