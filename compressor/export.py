"""Export a compressed checkpoint to a standard format other tools serve.

`compressed-tensors` (vLLM's format; `quant_method: compressed-tensors`): a 2:4-pruned model
(`prune` with pattern 2:4, N:M layers) is written as `sparse-24-bitmask`: per pruned linear
`<name>.compressed` (out, in/2) holds the kept values row by row, `<name>.bitmask` (out, in/8)
uint8 marks their positions (bit j of byte b = column 8b + j, little-endian, as numpy.packbits
with bitorder="little"), `<name>.shape` = [[out], [in]]; every other tensor is copied unchanged.
Layout of compressed-tensors <= 0.14 (`Sparse24BitMaskCompressor`, which reads it back); later
releases dropped the sparse formats.

What cannot be exported: the low-rank family (svd, asvd, svd-llm, saes-svd, welore, maestro)
and dsformer store each linear as a product of two factors (U V, D S). compressed-tensors stores
exactly one weight tensor per linear (dense, quantized, or sparse with a mask), so expressing
them means multiplying the factors back to a dense matrix: the saving would be gone. Adapter
layers (lora, nola, dsee) are not weights either. Those checkpoints are refused, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, ModelError
from .kernels.dispatch import expand_nm_indices, unpack_nm
from .kernels.packing import pack_bits
from .models import read_manifest
from .outdir import staged_output
from .registry import method_info

FORMATS = ("compressed-tensors",)
FORMAT_LAYOUT_VERSION = "0.14.0"  # the compressed-tensors release whose sparse-24 reader we target
WHY_NOT = {
    "low_rank": "the low-rank family (svd, asvd, svd-llm, saes-svd, welore, maestro) stores each linear as "
                "two factors U V, and compressed-tensors stores one weight tensor per linear (dense, "
                "quantized or sparse), so the factors would have to be multiplied back to dense weights",
    "dense_sparse": "dsformer stores each linear as a product D S of two factors, and compressed-tensors "
                    "stores one weight tensor per linear",
    "lora": "a LoRA adapter is not a weight format; merge it first (--merge)",
    "nola": "a NOLA adapter is not a weight format; merge it first (--merge)",
    "dsee": "a DSEE adapter is not a weight format; merge it first (--merge)",
}
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt")


def check_format(fmt: Any) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; use one of: {', '.join(FORMATS)}")


def check_exportable(layers: dict[str, dict[str, Any]], where: str) -> None:
    """ModelError naming why the checkpoint cannot be expressed in compressed-tensors."""
    for name, spec in layers.items():
        kind, args = spec.get("type"), spec.get("args", {})
        if kind in WHY_NOT:
            raise ModelError(f"{where}: layer `{name}` is {kind}: cannot be exported to compressed-tensors, "
                             f"because {WHY_NOT[kind]}; keep the compressor checkpoint (transformers loads it "
                             "after `import compressor`)")
        if kind != "nm_sparse" or (args.get("n", 2), args.get("m", 4)) != (2, 4):
            raise ModelError(f"{where}: layer `{name}` ({kind} {args.get('n')}:{args.get('m')}) is not 2:4; "
                             "compressed-tensors' sparse-24-bitmask holds 2:4 only: prune with pattern 2:4")
    if not layers:
        raise ModelError(f"{where} has no 2:4 layers to export; run `compressor compress -m prune` first")


def check_stages(fmt: str, stages: list[tuple[str, dict[str, Any]]]) -> None:
    """Before a run: `export: compressed-tensors` needs a 2:4 prune and no factoring stage."""
    check_format(fmt)
    for method, config in stages:
        if method_info(method).kind != "compress" or (method == "prune" and config.get("pattern") == "2:4"):
            continue
        if method == "prune":
            reason = "only the 2:4 pattern has a compressed-tensors format"
        elif method == "dsformer":
            reason = WHY_NOT["dense_sparse"]
        else:  # the low-rank family, and any compress method whose layers have no compressed-tensors format
            reason = WHY_NOT["low_rank"] if method_info(method).module.startswith("compressor.methods.") else (
                "its layers have no compressed-tensors format")
        raise ConfigError(f"recipe: `export: {fmt}` cannot hold the output of `{method}`: {reason}")


def export(source: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `source` (a compressor checkpoint) in `fmt` into `out` (atomically)."""
    check_format(fmt)
    source = Path(source)
    manifest = read_manifest(source) if source.is_dir() else None
    if manifest is None:
        raise ModelError(f"`{source}` is not a compressor checkpoint (no layer table in config.json); "
                         "pass the folder `compressor compress` wrote")
    check_exportable(manifest.get("layers", {}), f"`{source}`")
    check_layers_stored(source, manifest["layers"])
    with staged_output(Path(out), inputs=[source]) as tmp:
        write_sparse24(source, manifest["layers"], tmp)
    return Path(out)


def check_layers_stored(source: Path, layers: dict[str, dict[str, Any]]) -> None:
    """ModelError naming the first layer-table entry or tensor the checkpoint's files do not back."""
    from .ckpt_format import check_layer_spec, check_stored_tensors, stored_shapes

    where = f"checkpoint `{source}`"
    for name, spec in layers.items():
        check_layer_spec(name, spec, where)
    check_stored_tensors(layers, stored_shapes(source), where)


def export_beside(checkpoint: Path, fmt: str) -> Path:
    """The recipe's `export:` key: write `fmt` into `<checkpoint>/<fmt>/` (inside the staged run)."""
    manifest = read_manifest(checkpoint) or {}
    check_exportable(manifest.get("layers", {}), "this run's checkpoint")
    folder = checkpoint / fmt
    folder.mkdir()
    write_sparse24(checkpoint, manifest["layers"], folder)
    return folder


def write_sparse24(source: Path, layers: dict[str, dict[str, Any]], folder: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("model*.safetensors")):
        state.update(load_file(shard))
    for name, spec in layers.items():
        state.update(sparse24_tensors(name, state, spec["args"]))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = sparsity_config(sorted(layers), state, layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def sparse24_tensors(name: str, state: dict[str, torch.Tensor], args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pop `name`'s packed N:M tensors (and empty placeholder) from `state`; return its bitmask triple."""
    values, indices = state.pop(f"{name}.values"), state.pop(f"{name}.indices")
    state.pop(f"{name}.weight", None)
    out_f, in_f = args["out_features"], args["in_features"]
    slots = values.shape[-1]
    positions = expand_nm_indices(indices, 2, 4, slots).long()
    columns = torch.arange(slots) // 2 * 4 + positions  # (out, slots): each kept entry's column
    mask = torch.zeros(out_f, in_f, dtype=torch.bool).scatter_(1, columns, True)
    dense = unpack_nm(values, indices, 2, 4, in_f)
    return {f"{name}.compressed": dense[mask].reshape(out_f, in_f // 2).contiguous(),
            f"{name}.bitmask": pack_bits(mask),
            f"{name}.shape": torch.tensor([out_f, in_f]).reshape(-1, 1)}


def sparsity_config(targets: list[str], state: dict[str, torch.Tensor], layers: dict[str, Any]) -> dict[str, Any]:
    pruned = sum(spec["args"]["out_features"] * spec["args"]["in_features"] for spec in layers.values())
    total = sum(t.numel() for k, t in state.items() if not k.endswith((".bitmask", ".shape"))) + pruned // 2
    return {"quant_method": "compressed-tensors", "format": "sparse-24-bitmask", "version": FORMAT_LAYOUT_VERSION,
            "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                                "global_sparsity": (pruned / 2) / total, "targets": targets, "ignore": [],
                                "registry_requires_subclass": False}}
