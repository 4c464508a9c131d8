"""Export a compressed checkpoint to a standard format other tools serve.

`compressed-tensors` (vLLM's format; `quant_method: compressed-tensors`) in one of two layouts,
chosen by what the checkpoint holds:

* `pack-quantized` (weight-only int4 / int8, what llm-compressor writes for W4A16 / W8A16 and vLLM
  serves): per quantized linear `<name>.weight_packed` int32 (out, ceil(in / (32 / bits))), code j
  of a row at bits [j*bits, (j+1)*bits) of the row's little-endian stream of words, codes unsigned
  c = q + 2^(bits-1); `<name>.weight_scale` (out, in / group) in the checkpoint dtype;
  `<name>.weight_shape` int32 [out, in]; asymmetric layers add `<name>.weight_zero_point` int32, the
  zero-point codes packed the same way along the OUTPUT dim (ceil(out / (32 / bits)), in / group).
  compressed-tensors dequantizes (c - 2^(bits-1) - (z - 2^(bits-1))) * s = (c - z) * s, the grid of
  compressor's `quant` layers, so the weights are the same. The quantization_config has one config
  group per (bits, group size, symmetric) listing its linears by name.
* `sparse-24-bitmask` (a 2:4-pruned model, N:M layers): per pruned linear `<name>.compressed`
  (out, in/2) holds the kept values row by row, `<name>.bitmask` (out, in/8) uint8 marks their
  positions (bit j of byte b = column 8b + j, little-endian, as numpy.packbits with
  bitorder="little"), `<name>.shape` = [[out], [in]]. Layout of compressed-tensors <= 0.14
  (`Sparse24BitMaskCompressor`, which reads it back); later releases dropped the sparse formats,
  and vLLM removed its Sparse24 support in 2026, so no current vLLM serves it.

Every other tensor is copied unchanged.

What cannot be exported: the low-rank family (svd, asvd, svd-llm, saes-svd, welore, maestro)
and dsformer store each linear as a product of two factors (U V, D S), quantized or not.
compressed-tensors stores exactly one weight tensor per linear (dense, quantized, or sparse with a
mask), so expressing them means multiplying the factors back to a dense matrix: the saving would be
gone. The same holds for a quantized layer with a low-rank correction (Q + U V). 2- and 3-bit
codes have no vLLM kernel behind pack-quantized, and a checkpoint mixing 2:4 and quantized layers
would need the dropped marlin-24 layout. Adapter layers (lora, nola, dsee) are not weights either.
Those checkpoints are refused, nothing written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .ckpt_format import IMPORT_HINT
from .errors import ConfigError, ModelError
from .kernels.dispatch import expand_nm_indices, unpack_nm
from .kernels.packing import pack_bits
from .models import read_manifest
from .outdir import staged_output
from .registry import method_info

FORMATS = ("compressed-tensors",)
# Formats asked for that are not written, and why (the one line the error gives).
NOT_WRITTEN = {
    "bitsandbytes": "bitsandbytes stores 8-bit weights as one absmax scale per row (codes -127..127) and 4-bit "
                    "weights as nf4 (a non-uniform 16-level grid per block of 64): a grouped int8/int4 checkpoint "
                    "would have to be re-quantized onto those grids, a different (lossier) model; load the dense "
                    "model with transformers' BitsAndBytesConfig instead (`--load-in 4bit`)",
}
FORMAT_LAYOUT_VERSION = "0.14.0"  # the compressed-tensors release whose readers we target
SPARSE24, PACKED = "sparse-24-bitmask", "pack-quantized"
PACKED_BITS = (4, 8)  # what vLLM's pack-quantized (W4A16 / W8A16) kernels serve
WHY_NOT = {
    "low_rank": "the low-rank family (svd, asvd, svd-llm, saes-svd, welore, maestro) stores each linear as "
                "two factors U V, and compressed-tensors stores one weight tensor per linear (dense, "
                "quantized or sparse), so the factors would have to be multiplied back to dense weights",
    "low_rank_quant": "a quantized low-rank layer stores each linear as two quantized factors U V, and "
                      "compressed-tensors stores one weight tensor per linear (dense, quantized or sparse)",
    "dense_sparse": "dsformer stores each linear as a product D S of two factors, and compressed-tensors "
                    "stores one weight tensor per linear",
    "nm_sparse_quant": "2:4 with quantized kept values is compressed-tensors' marlin-24 layout, which vLLM "
                       "dropped in 2026 (and compressed-tensors after 0.14); export the 2:4 model before "
                       "quantizing, or quantize a dense model",
    "quant_embedding": "its input embedding is quantized (`embedding_bits`), and compressed-tensors' "
                       "pack-quantized export holds quantized linears beside a dense embedding; re-quantize "
                       "without `embedding_bits` to export",
    "quant_tied_head": "its lm_head reads the quantized embedding's codes (`embedding_bits`), and "
                       "compressed-tensors' pack-quantized export holds quantized linears beside a dense "
                       "embedding; re-quantize without `embedding_bits` to export",
    "lora": "a LoRA adapter is not a weight format; merge it first (--merge)",
    "nola": "a NOLA adapter is not a weight format; merge it first (--merge)",
    "dsee": "a DSEE adapter is not a weight format; merge it first (--merge)",
}
QUANT_METHODS = ("gptq", "rtn")  # compress methods whose layers are `quant`
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt")


def check_format(fmt: Any) -> None:
    if fmt in NOT_WRITTEN:
        raise ConfigError(f"export format {fmt!r} is not written: {NOT_WRITTEN[fmt]}")
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; use one of: {', '.join(FORMATS)}")


def check_exportable(layers: dict[str, dict[str, Any]], where: str) -> str:
    """The compressed-tensors layout that holds every compressed layer (SPARSE24 or PACKED), or a
    ModelError naming the first layer that cannot be expressed and why."""
    embedding_first = sorted(layers.items(), key=lambda item: item[1].get("type") != "quant_embedding")
    layouts = {_layout_of(name, spec, where) for name, spec in embedding_first}
    if not layouts:
        raise ModelError(f"{where} has no 2:4 or int4/int8 layers to export; run `compressor compress -m prune` "
                         "or `-m gptq --bits 4` first")
    if len(layouts) > 1:
        raise ModelError(f"{where} mixes 2:4 and quantized layers: compressed-tensors holds that only as marlin-24, "
                         "which vLLM dropped in 2026; export a checkpoint with one of the two")
    return layouts.pop()


def _layout_of(name: str, spec: dict[str, Any], where: str) -> str:
    kind, args = spec.get("type"), spec.get("args", {})
    if kind in WHY_NOT:
        raise ModelError(f"{where}: layer `{name}` is {kind}: cannot be exported to compressed-tensors, "
                         f"because {WHY_NOT[kind]}; keep the compressor checkpoint (transformers loads it "
                         "after `import compressor`)")
    if kind == "quant":
        problem = _pack_problem(args)
        if problem:
            raise ModelError(f"{where}: layer `{name}` {problem}")
        return PACKED
    if kind != "nm_sparse" or (args.get("n", 2), args.get("m", 4)) != (2, 4):
        raise ModelError(f"{where}: layer `{name}` ({kind} {args.get('n')}:{args.get('m')}) is not 2:4; "
                         "compressed-tensors' sparse-24-bitmask holds 2:4 only: prune with pattern 2:4")
    return SPARSE24


def _pack_problem(args: dict[str, Any]) -> str | None:
    if args.get("bits") not in PACKED_BITS:
        return (f"is {args.get('bits')}-bit: compressed-tensors' pack-quantized is served (vLLM W4A16 / W8A16) "
                "for 4- and 8-bit codes only; quantize with --bits 4 or --bits 8")
    if args.get("embedding_bits"):
        return ("quantizes the input embedding (`embedding_bits`), and compressed-tensors' pack-quantized "
                "export holds quantized linears beside a dense embedding; drop `embedding_bits`")
    if args.get("correction_rank"):
        return (f"carries a rank-{args['correction_rank']} low-rank correction U V beside its codes, and "
                "compressed-tensors stores one weight tensor per linear; quantize without `correction_rank`")
    return None


def check_stages(fmt: str, stages: list[tuple[str, dict[str, Any]]]) -> None:
    """Before a run: `export: compressed-tensors` needs a 2:4 prune or an int4/int8 quantization
    (not both) and no factoring stage."""
    check_format(fmt)
    layouts = set()
    for method, config in stages:
        if method_info(method).kind != "compress":
            continue
        if method == "prune" and config.get("pattern") == "2:4":
            layouts.add(SPARSE24)
            continue
        if method in QUANT_METHODS and not _pack_problem(config):
            layouts.add(PACKED)
            continue
        raise ConfigError(f"recipe: `export: {fmt}` cannot hold the output of `{method}`: "
                          f"{_stage_reason(method, config)}")
    if len(layouts) > 1:
        raise ConfigError(f"recipe: `export: {fmt}` cannot hold 2:4 and quantized layers together (marlin-24, "
                          "dropped by vLLM in 2026); drop one of the two stages or the export")


def _stage_reason(method: str, config: dict[str, Any]) -> str:
    if method == "prune":
        return "only the 2:4 pattern has a compressed-tensors format"
    if method in QUANT_METHODS:
        return "its layer " + (_pack_problem(config) or "")
    if method == "dsformer":
        return WHY_NOT["dense_sparse"]
    # the low-rank family, and any compress method whose layers have no compressed-tensors format
    if method_info(method).module.startswith("compressor.methods."):
        return WHY_NOT["low_rank"]
    return "its layers have no compressed-tensors format"


def export(source: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `source` (a compressor checkpoint) in `fmt` into `out` (atomically)."""
    check_format(fmt)
    source = Path(source)
    manifest = read_manifest(source) if source.is_dir() else None
    if manifest is None:
        raise ModelError(f"`{source}` is not a compressor checkpoint (no layer table in config.json); "
                         "pass the folder `compressor compress` wrote")
    layout = check_exportable(manifest.get("layers", {}), f"`{source}`")
    check_layers_stored(source, manifest["layers"])
    with staged_output(Path(out), inputs=[source]) as tmp:
        write_compressed_tensors(source, manifest["layers"], layout, tmp)
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
    layout = check_exportable(manifest.get("layers", {}), "this run's checkpoint")
    folder = checkpoint / fmt
    folder.mkdir()
    write_compressed_tensors(checkpoint, manifest["layers"], layout, folder)
    return folder


def write_compressed_tensors(source: Path, layers: dict[str, dict[str, Any]], layout: str, folder: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("model*.safetensors")):
        state.update(load_file(shard))
    layer_tensors: Callable[..., dict[str, torch.Tensor]] = sparse24_tensors if layout == SPARSE24 else packed_tensors
    state.pop(IMPORT_HINT, None)  # compressor's own marker: compressed-tensors loaders need no hint
    for name, spec in layers.items():
        state.update(layer_tensors(name, state, spec["args"]))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = (sparsity_config(sorted(layers), state, layers) if layout == SPARSE24
                                     else pack_quantized_config(layers))
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


# -- pack-quantized ----------------------------------------------------------------------------------


def packed_tensors(name: str, state: dict[str, torch.Tensor], args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pop `name`'s packed codes, scales, zeros (and empty placeholder) from `state`; return its
    pack-quantized tensors (layout in the module docstring)."""
    qweight, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
    zeros = state.pop(f"{name}.zeros", None)
    state.pop(f"{name}.weight", None)
    bits = args["bits"]
    tensors = {f"{name}.weight_packed": bytes_to_words(qweight),
               f"{name}.weight_scale": scales.contiguous(),
               f"{name}.weight_shape": torch.tensor([args["out_features"], args["in_features"]], dtype=torch.int32)}
    if zeros is not None:  # one code per byte, packed along the output dim as compressed-tensors reads it
        tensors[f"{name}.weight_zero_point"] = codes_to_words(zeros.t(), bits).t().contiguous()
    return tensors


def bytes_to_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 rows (rows, n) -> int32 rows (rows, ceil(n / 4)): byte 4k + i is bits [8i, 8i + 8) of
    word k, zero-padded. For 4- and 8-bit codes packed lowest bits first, this is exactly
    compressed-tensors' int32 packing of the same codes (code j at bits [j*b, (j+1)*b) of the row's
    little-endian stream in both)."""
    padded = torch.nn.functional.pad(packed.to(torch.int64), (0, (-packed.shape[-1]) % 4))
    shifts = torch.arange(4, dtype=torch.int64) * 8
    return _to_int32((padded.reshape(packed.shape[0], -1, 4) << shifts).sum(-1))


def codes_to_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """One code per byte (rows, n) -> int32 (rows, ceil(n / (32 // bits))), code j of a row at bits
    [j*bits, (j+1)*bits) of the row's words (compressed-tensors' `pack_to_int32` of the same codes)."""
    per_word = 32 // bits
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-codes.shape[-1]) % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    return _to_int32((padded.reshape(codes.shape[0], -1, per_word) << shifts).sum(-1))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_quantized_config(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config.json's quantization_config: one weight-only config group per distinct grid, its
    linears named exactly (so layers quantized at different bits keep their own scheme)."""
    grids: dict[tuple, list[str]] = {}
    for name in sorted(layers):
        args = layers[name]["args"]
        channel = args["group_size"] in (None, -1, args["in_features"])
        grid = (args["bits"], bool(args["symmetric"]), None if channel else args["group_size"])
        grids.setdefault(grid, []).append(name)
    groups = {f"group_{i}": {"targets": names, "weights": weight_args(*grid), "input_activations": None,
                             "output_activations": None, "format": PACKED}
              for i, (grid, names) in enumerate(grids.items())}
    return {"quant_method": "compressed-tensors", "format": PACKED, "quantization_status": "compressed",
            "version": FORMAT_LAYOUT_VERSION, "config_groups": groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def weight_args(bits: int, symmetric: bool, group_size: int | None) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of a static weight-only integer grid."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False, "actorder": None,
            "strategy": "channel" if group_size is None else "group", "group_size": group_size,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
