"""The one reader of checkpoint directories: weight files, their headers, and each module's own tensors.

::

    directory ──► find_shards: model.safetensors.index.json | *.safetensors | (opt-in) pytorch_model*.bin
              ──► read_catalog: every tensor's file, shape, dtype, offset and size, from the headers (validated:
                  truncated or corrupt files, index entries that are missing or in another file are errors)
              ──► modules() / int4_modules(): the catalog grouped by module, ``{module: {local name: key}}``
              ──► iter_module_tensors(requests): tensors read one at a time, shard by shard in file order; a
                  request is yielded as soon as its last tensor is read

The loader, the base fingerprint and ``inspect`` all read checkpoints through it. Only safetensors are read unless
``allow_pickle=True``. The ``quantization_config`` in ``config.json`` is parsed by
:mod:`int4lora_train.quant.checkpoint_config`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from int4lora_train.errors import CheckpointError
from int4lora_train.quant.formats import int4_markers, read_int4_weight
from int4lora_train.quant.layout import Int4Weight
from int4lora_train.quant.scheme import Int4CheckpointConfig, TargetGroup

SINGLE_FILE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives and what it is, read from its shard's header."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch has no name for here (its bytes are still counted)
    offset: int = 0
    nbytes: int = 0


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; errors name the file and say what it should have been (``what``)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no {what}; is {path.parent} a checkpoint directory?") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc}).") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object.")
    return value


def module_and_local(key: str) -> tuple[str, str]:
    """``model.layers.0.mlp.up_proj.qweight`` -> (``model.layers.0.mlp.up_proj``, ``qweight``)."""
    module, _, local = key.rpartition(".")
    return module, local


# ------------------------------------------------------------------------------------------------------ shards


def find_shards(directory: Path, allow_pickle: bool = False) -> tuple[list[Path], Path | None]:
    """The weight files in load order, and the index file when there is one."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass an INT4 checkpoint directory.")
    index = directory / SAFE_INDEX
    if index.exists():
        return _files_from_index(index), index
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None
    bin_index = directory / BIN_INDEX
    bin_files = _files_from_index(bin_index) if bin_index.exists() else sorted(directory.glob("pytorch_model*.bin"))
    if bin_files:
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: only pickled weights ({', '.join(f.name for f in bin_files[:3])}) were found; "
                "unpickling can run arbitrary code, so it is off by default. Convert the checkpoint to safetensors, "
                "or pass allow_pickle=True if you trust its source."
            )
        return bin_files, bin_index if bin_index.exists() else None
    raise CheckpointError(f"{directory}: no weights found (no *.safetensors, no {SAFE_INDEX}).")


def _files_from_index(index: Path) -> list[Path]:
    weight_map = read_json(index, what="shard index").get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map; the shard index is corrupt.")
    files = list(dict.fromkeys(index.parent / name for name in weight_map.values()))
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(
            f"{index} lists shard(s) {missing} that do not exist in {index.parent}; the download is incomplete."
        )
    return files


def read_catalog(shards: list[Path], index: Path | None) -> dict[str, TensorInfo]:
    """Every tensor's file, shape and dtype, from the shard headers (no tensor data is read)."""
    catalog: dict[str, TensorInfo] = {}
    for shard in shards:
        infos = _safetensors_header(shard) if shard.suffix == ".safetensors" else _pickle_header(shard)
        for key, info in infos.items():
            if key in catalog:
                raise CheckpointError(f"{shard}: tensor {key!r} is also stored in {catalog[key].file.name}.")
            catalog[key] = info
    if index is not None:
        weight_map = read_json(index, what="shard index")["weight_map"]
        for key, file_name in weight_map.items():
            info = catalog.get(key)
            if info is None:
                raise CheckpointError(
                    f"{index.parent / file_name}: tensor {key!r} is missing, although {index.name} lists it in that "
                    "shard; the shard is incomplete or from another checkpoint."
                )
            if info.file.name != file_name:
                raise CheckpointError(f"{index}: lists {key!r} in {file_name} but it is stored in {info.file.name}.")
    return catalog


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, JSON) and check the data is all there."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror}).") from exc
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download it.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: the header claims {header_len} bytes but the file "
                f"has {size}; re-download it."
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-download it.") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it.")
    data_size = size - 8 - header_len
    infos = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r} ({exc}).") from exc
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {end} of the data section but the file holds "
                f"only {data_size} data bytes; re-download the shard."
            )
        infos[key] = TensorInfo(path, shape, dtype, begin, end - begin)
    return infos


read_safetensors_header = _safetensors_header
"""``{key: TensorInfo}`` of a safetensors file; :class:`CheckpointError` naming the file when it is truncated."""


def _pickle_header(path: Path) -> dict[str, TensorInfo]:
    state = _load_pickle(path)
    return {
        key: TensorInfo(path, tuple(t.shape), t.dtype, nbytes=t.numel() * t.element_size()) for key, t in state.items()
    }


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: cannot read the pickled weights ({type(exc).__name__}: {exc}).") from exc


def _iter_shard(path: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` of one shard, one tensor at a time, in the given order; errors name the file."""
    if path.suffix != ".safetensors":
        state = _load_pickle(path)
        for key in keys:
            yield key, state[key]
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in keys:
                yield key, reader.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError for damaged files
        if type(exc).__name__ in ("SafetensorError",) or isinstance(exc, OSError):
            raise CheckpointError(f"{path}: cannot read the shard ({exc}); it is corrupt or truncated.") from exc
        raise


# -------------------------------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class CheckpointDir:
    """A checkpoint directory's weight files and every tensor's place in them (headers only until tensors are read)."""

    path: Path
    shards: list[Path]
    index: Path | None
    catalog: dict[str, TensorInfo]
    stored_keys: dict[str, str] = field(default_factory=dict)
    """Catalog key -> the key stored in the shard, for keys :meth:`renamed` changed (empty: none renamed)."""

    @classmethod
    def open(cls, path, allow_pickle: bool = False) -> CheckpointDir:
        """Find the shards and read (and validate) their headers."""
        directory = Path(path)
        shards, index = find_shards(directory, allow_pickle)
        return cls(directory, shards, index, read_catalog(shards, index))

    def renamed(self, rename) -> CheckpointDir:
        """This directory with every key ``k`` catalogued as ``rename(k)`` (reads still use the stored keys); for
        checkpoints whose module names differ from the model's (Mixtral's ``block_sparse_moe`` is transformers 5's
        ``mlp``)."""
        catalog, stored = {}, {}
        for key, info in self.catalog.items():
            new = rename(key)
            if new in catalog:
                raise CheckpointError(f"{info.file}: {key!r} and another tensor both map to {new!r}.")
            catalog[new] = info
            if new != key or key in self.stored_keys:
                stored[new] = self.stored_keys.get(key, key)
        return replace(self, catalog=catalog, stored_keys=stored)

    @property
    def where(self) -> Path:
        """The file that lists the tensors (the index, else the first shard), for error messages."""
        return self.index or self.shards[0]

    def modules(self) -> dict[str, dict[str, str]]:
        """Every module's own tensors: ``{module name: {local name: checkpoint key}}`` (root tensors under "")."""
        grouped: dict[str, dict[str, str]] = {}
        for key in self.catalog:
            module, local = module_and_local(key)
            grouped.setdefault(module, {})[local] = key
        return grouped

    def int4_modules(self) -> dict[str, dict[str, str]]:
        """The modules holding an INT4 format's marker tensor (``weight_packed``, ``qweight``, ...), with all their
        own tensors (a bias included)."""
        markers = int4_markers()
        return {name: tensors for name, tensors in self.modules().items() if markers & tensors.keys()}

    def iter_module_tensors(
        self, requests: Mapping[str, Mapping[str, str]]
    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(name, {local name: tensor})`` for every request (``{name: {local name: checkpoint key}}``), yielded as
        soon as its last tensor is read.

        Tensors are read one at a time, shard by shard in file order, so no shard is held whole; a request whose
        tensors span shards is completed in the shard holding its last tensor. On the CPU, tensors stay
        memory-mapped from the shards as safetensors returns them.
        """
        owner: dict[str, tuple[str, str]] = {}
        for name, tensors in requests.items():
            for local, key in tensors.items():
                if key not in self.catalog or key in owner:
                    problem = "no such tensor" if key not in self.catalog else f"also wanted as {owner[key]}"
                    raise CheckpointError(f"{self.where}: {key!r} wanted as {(name, local)}: {problem}.")
                owner[key] = (name, local)
        remaining = {name: len(tensors) for name, tensors in requests.items()}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for shard in self.shards:
            in_shard = sorted((k for k in owner if self.catalog[k].file == shard), key=lambda k: self.catalog[k].offset)
            stored = [self.stored_keys.get(k, k) for k in in_shard]
            for key, (_, tensor) in zip(in_shard, _iter_shard(shard, stored)):
                name, local = owner[key]
                pending.setdefault(name, {})[local] = tensor
                remaining[name] -= 1
                if remaining[name] == 0:
                    yield name, pending.pop(name)

    def iter_int4_weights(
        self, quant_config: Int4CheckpointConfig
    ) -> Iterator[tuple[str, Int4Weight, dict[str, torch.Tensor]]]:
        """``(module, canonical weight, its own tensors as stored)`` for every INT4 module, one module at a time.

        Each module is read with its scheme in ``quant_config`` (none when the config does not quantize it);
        reading checks the tensors, so a corrupt module raises with its name.
        """
        requests = {
            name: tensors
            for name, tensors in self.int4_modules().items()
            if not getattr(quant_config.scheme_for(name, "Linear"), "dequantize", False)
        }
        for name, tensors in self.iter_module_tensors(requests):
            yield name, read_int4_weight(tensors, name, quant_config.scheme_for(name, "Linear")), tensors

    def dequantized_modules(self, quant_config: Int4CheckpointConfig) -> dict[str, tuple[TargetGroup, dict[str, str]]]:
        """``{module: (its config group, {local name: checkpoint key})}`` for every module of an 8-bit group that the
        loader dequantizes at load (mixed-precision checkpoints; quant/dequant_at_load.py); from the headers only."""
        from int4lora_train.quant.dequant_at_load import TENSOR_NAMES

        modules = {}
        for name, tensors in self.modules().items():
            group = quant_config.group_for(name, "Linear") if "weight_scale" in tensors else None
            if group is not None and group.scheme.dequantize:
                modules[name] = (group, {local: key for local, key in tensors.items() if local in TENSOR_NAMES})
        return modules

    def iter_dequantized_modules(
        self, quant_config: Int4CheckpointConfig
    ) -> Iterator[tuple[str, TargetGroup, dict[str, torch.Tensor]]]:
        """``(module, its config group, its quantized tensors as stored)`` for every module of
        :meth:`dequantized_modules`, one at a time."""
        modules = self.dequantized_modules(quant_config)
        for name, tensors in self.iter_module_tensors({name: keys for name, (_, keys) in modules.items()}):
            yield name, modules[name][0], tensors
