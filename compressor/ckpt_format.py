"""The compressed checkpoint format: a standard Hugging Face folder whose config.json carries
`quantization_config = {quant_method: "compressor", format_version, layers: {name: {type, args}},
...run metadata}`. How `transformers` learns to read it: `hf_register` (the import hook) and
`hf_quantizer` (the quantizer), both built on the constants and checks here.

* Placeholders: every compressed layer that has no dense-shaped `weight` of its own (low-rank,
  N:M, dense x sparse) is also written as an empty `<name>.weight` tensor, and the checkpoint holds
  one more empty tensor, IMPORT_HINT, named after the fix. Plain transformers
  (compressor not imported: the quant_method is unknown, so it skips quantization) then meets a
  size mismatch for that key and raises, instead of loading random weights; compressor's
  quantizer ignores those keys.
* Nothing here imports the method registry or peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ModelError

if TYPE_CHECKING:  # `import compressor` imports this module and must not pay for torch
    from torch import nn

QUANT_METHOD = "compressor"
# An empty tensor in every compressed checkpoint: plain transformers (which only prints the unknown
# quant_method and a load report of key names) lists it as UNEXPECTED, so its name carries the fix.
IMPORT_HINT = "import_compressor_first_to_load_this_checkpoint"
FORMAT_VERSION = 2  # 1 = compression.json beside a plain config.json (still read by compressor.load)


def quantization_config(layers: dict[str, dict[str, Any]], metadata: dict[str, Any] | None = None) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "compressor_version": __version__, **(metadata or {}), "layers": layers}


def is_compressed_config(config_dict: dict[str, Any]) -> bool:
    qc = config_dict.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def check_version(version: Any, where: str = "this checkpoint") -> None:
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{where} uses compressor checkpoint format version {version!r}, newer than this "
                         f"compressor reads ({FORMAT_VERSION}); upgrade it: pip install -U compressor")


def placeholder_names(layers: dict[str, nn.Module]) -> list[str]:
    """`<name>.weight` keys written empty for layers without a dense-shaped weight of their own,
    plus IMPORT_HINT, whose name plain transformers prints in its load report."""
    names = [f"{name}.weight" for name, layer in layers.items() if "weight" not in layer.state_dict()]
    return names + [IMPORT_HINT] if layers else names


# -- validation: before anything is allocated ----------------------------------------------------


def check_layer_table(model: nn.Module, layers: Any, where: str) -> None:
    """ModelError naming the first layer-table entry the freshly built model cannot take."""
    if not isinstance(layers, dict):
        raise ModelError(f"{where}: `quantization_config.layers` must be a mapping of module names, got "
                         f"{type(layers).__name__}; the checkpoint is damaged, re-create it")
    from .layers.base import is_linear, linear_shape

    modules = dict(model.named_modules())
    for name, spec in layers.items():
        module = modules.get(name)
        if module is None or not (is_linear(module) or _is_embedding(module)):
            raise ModelError(f"{where}: layer table names `{name}`, which is not a linear layer of "
                             f"{type(model).__name__}; the checkpoint does not match its config.json")
        kind, args = check_layer_spec(name, spec, where)
        embedding = kind == "quant_embedding"  # a lookup table: (num_embeddings, embedding_dim) = (out, in)
        if embedding != _is_embedding(module):
            raise ModelError(f"{where}: layer `{name}` ({kind}) is {'not ' * embedding}an embedding in "
                             f"{type(model).__name__}; the checkpoint does not match its config.json")
        problem = _shape_problem(kind, args, tuple(module.weight.shape) if embedding else linear_shape(module))
        if problem:
            raise ModelError(f"{where}: layer `{name}` ({kind}): {problem}; the checkpoint is damaged, re-create it")


def _is_embedding(module: nn.Module) -> bool:
    return type(module).__name__ == "Embedding" and getattr(module, "weight", None) is not None


def check_layer_spec(name: str, spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(type, args) of one layer-table entry: a known type whose args are exactly its own."""
    import inspect

    from .layers import LAYER_TYPES

    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in LAYER_TYPES:
        raise ModelError(f"{where}: layer `{name}` has unknown type {kind!r} (known: {sorted(LAYER_TYPES)}); "
                         "upgrade compressor, or re-create the checkpoint")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise ModelError(f"{where}: layer `{name}`: `args` must be a mapping, got {args!r}; the checkpoint is "
                         "damaged, re-create it")
    params = inspect.signature(LAYER_TYPES[kind].__init__).parameters
    known = set(params) - {"self", "dtype", "device"}
    required = {p for p in known if params[p].default is inspect.Parameter.empty}
    unknown, missing = sorted(set(args) - known), sorted(required - set(args))
    if unknown or missing:
        what = f"unknown arg `{unknown[0]}`" if unknown else f"missing arg `{missing[0]}`"
        raise ModelError(f"{where}: layer `{name}` ({kind}): {what} (its args: {sorted(known)}); the checkpoint "
                         "is damaged, re-create it")
    for key, value in args.items():
        problem = _value_problem(str(params[key].annotation), value)
        if problem:
            raise ModelError(f"{where}: layer `{name}` ({kind}): `{key}` {problem}, got {value!r}; the checkpoint "
                             "is damaged, re-create it")
    problem = _shape_problem(kind, args, (args["out_features"], args["in_features"]))
    if problem:
        raise ModelError(f"{where}: layer `{name}` ({kind}): {problem}; the checkpoint is damaged, re-create it")
    return kind, args


MAX_DIM = 1 << 31  # no linear dimension, rank or count in a checkpoint reaches this


def _value_problem(annotation: str, value: Any) -> str | None:
    """Why `value` cannot fill a layer argument annotated `annotation` ('int', 'float', 'bool')."""
    import math

    if annotation == "bool" and not isinstance(value, bool):
        return "must be true or false"
    if annotation == "int" and not (_is_int(value, 0) and value < MAX_DIM):
        return f"must be an integer in 0..{MAX_DIM - 1}"
    if annotation == "float" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value)):
        return "must be a finite number"
    return None


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _shape_problem(kind: str, args: dict[str, Any], shape: tuple[int, int]) -> str | None:
    out_f, in_f = shape
    if (args.get("out_features"), args.get("in_features")) != (out_f, in_f):
        return (f"shape {args.get('out_features')}x{args.get('in_features')} differs from the model's "
                f"{out_f}x{in_f}")
    rank = args.get("rank")
    if "rank" in args and not (_is_int(rank) and rank <= min(in_f, out_f)):
        return f"rank {rank!r} is outside 1..{min(in_f, out_f)} (1 to min(out, in))"
    n, m = args.get("n", 2), args.get("m", 4)
    unstructured = kind == "dense_sparse" and m == 0  # dsformer's unstructured S: nnz per column
    if kind in ("nm_sparse", "dense_sparse", "nm_sparse_quant") and not unstructured and not (
            _is_int(n) and _is_int(m) and n < m):
        return f"pattern {n!r}:{m!r} is not N:M with 0 < N < M"
    if kind in ("nm_sparse", "nm_sparse_quant") and in_f % m:
        return f"in_features {in_f} is not a multiple of M={m}"
    if kind == "dense_sparse" and not (_is_int(args.get("k")) and (unstructured or args["k"] % m == 0)):
        return f"inner dimension k={args.get('k')!r} must be a positive multiple of M={m}"
    if kind == "low_rank_quant" and not (_is_int(rank) and _divides(args.get("u_group_size") or rank, rank)):
        return f"rank {rank!r} / u_group_size {args.get('u_group_size')!r} do not fit"
    if kind == "nm_sparse_quant" and not (args.get("bits") in (2, 3, 4, 8) and _divides(args.get("group_size"), in_f // m * n)):
        return f"group_size {args.get('group_size')!r} does not divide the {in_f // m * n} kept values per row"
    if kind in ("quant", "low_rank_quant", "quant_embedding") and not (args.get("bits") in (2, 3, 4, 8) and _divides(args.get("group_size"), in_f)):
        return f"bits {args.get('bits')!r} / group_size {args.get('group_size')!r} are not a b-bit grid over {in_f} inputs"
    return None


def _divides(group: Any, width: int) -> bool:
    return _is_int(group) and width % group == 0


def check_stored_tensors(layers: dict[str, Any], stored: dict[str, tuple[int, ...]], where: str,
                         placeholders: bool = True) -> None:
    """ModelError naming the first tensor of a compressed layer that `stored` ({name: shape}, the
    checkpoint's safetensors headers) lacks or holds with another shape than the table implies."""
    import torch

    from .layers import build_layer

    for name, spec in layers.items():
        with torch.device("meta"):
            expected = {f"{name}.{key}": tuple(t.shape) for key, t in build_layer(spec).state_dict().items()}
        if placeholders and f"{name}.weight" not in expected:
            expected[f"{name}.weight"] = (0,)
        for key, shape in expected.items():
            if key not in stored:
                raise ModelError(f"{where}: tensor `{key}` is missing from the weights; the checkpoint is "
                                 "incomplete, re-create or re-download it")
            if tuple(stored[key]) != shape:
                raise ModelError(f"{where}: tensor `{key}` has shape {list(stored[key])}, the layer table says "
                                 f"{list(shape)}; the checkpoint is damaged, re-create or re-download it")


def stored_shapes(folder: Any) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a checkpoint's `model*.safetensors` shards, read from their headers."""
    from pathlib import Path

    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes
