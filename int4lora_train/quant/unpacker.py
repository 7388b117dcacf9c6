"""The cached INT4 unpacker: the seed prototype's public API (vLLM PR #28793's ``INT4Unpacker``), made correct.

What changed from the prototype (PEFT_VLLM.md §2.4):

- ``unpack_module`` reads real modules through :func:`~int4lora_train.quant.formats.read_module_int4_weight`:
  compressed-tensors (int32 ``weight_packed``, zero points packed along the output axis, ``weight_shape``,
  ``weight_g_idx``), GPTQ, AWQ and the uint8 layout, instead of rejecting int32 words;
- dequantization is :func:`~int4lora_train.quant.dequant.dequantize` (bit-exact in the scale's dtype, then cast),
  not float math in the output dtype;
- the cache has an optional byte budget with LRU eviction, keys that include the dtype, and byte counts in its
  stats; an entry is recomputed when the module's packed tensor was replaced or modified in place;
- failures raise (:class:`~int4lora_train.errors.Int4FormatError`, ...); None means only "this module is not INT4".
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

from int4lora_train.errors import ConfigError
from int4lora_train.quant.dequant import dequantize
from int4lora_train.quant.formats import (
    from_compressed_tensors,
    from_uint8,
    is_int4_module,
    module_tensors,
    read_module_int4_weight,
)
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)

__all__ = [
    "INT4Unpacker",
    "clear_cache",
    "get_cache_stats",
    "get_unpacker",
    "is_int4_quantized",
    "unpack_int4_weights",
    "unpack_module",
]


class INT4Unpacker:
    """Dequantizes INT4 weights and keeps the dense results in an LRU cache of at most ``max_cache_bytes``
    (unbounded when None). Thread-safe: the cache is guarded by a lock; dequantization runs outside it."""

    def __init__(self, max_cache_bytes: int | None = None):
        self._max_bytes = _checked_budget(max_cache_bytes)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, tuple]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.RLock()

    def __deepcopy__(self, memo):
        # One budget for a whole model (and a lock): copies of the layers that use it share it.
        return self

    # ------------------------------------------------------------------------------------------ the seed's API

    def unpack_int4_weights(
        self,
        packed_weights: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor | None = None,
        group_size: int | None = None,
        output_dtype: torch.dtype = torch.float16,
    ) -> torch.Tensor:
        """Dense ``[out, in]`` in ``output_dtype`` (not cached).

        ``packed_weights``: uint8 ``[out, in/2]`` (two values per byte, even column in the low nibble; ``in =
        2 * packed_weights.shape[1]``) or compressed-tensors int32 words ``[out, in/8]``. ``scales``: ``[1]``,
        ``[out]``, ``[out, 1]`` or ``[out, G]``. ``zero_points``: unpacked signed values of the same shapes, or for
        int32 words also compressed-tensors' packed int32 ``[ceil(out/8), G]``. ``group_size`` is inferred from the
        scales when omitted and unambiguous.
        """
        weight = _weight_from_arrays(packed_weights, scales, zero_points, group_size)
        return dequantize(weight, output_dtype)

    def unpack_module(
        self,
        module: torch.nn.Module,
        module_name: str,
        force: bool = False,
        output_dtype: torch.dtype = torch.float16,
    ) -> torch.Tensor | None:
        """The module's dense weight in ``output_dtype``, cached under ``(module_name, output_dtype)``.

        Returns None only when the module holds no INT4 weight; a malformed or unsupported one raises. ``force``
        recomputes (and re-caches) even on a hit.
        """
        key = (module_name, output_dtype)
        token = _token(module_tensors(module))
        if not force:
            cached = self._lookup(key, token)
            if cached is not None:
                return cached
        else:
            self._count_miss()
        weight = read_module_int4_weight(module, module_name)
        if weight is None:
            logger.debug("%s holds no INT4 weight", module_name)
            return None
        dense = dequantize(weight, output_dtype)
        self._store(key, dense, token)
        return dense

    def is_int4_quantized(self, module: torch.nn.Module) -> bool:
        """True when the module holds an INT4 weight in a supported layout."""
        return is_int4_module(module)

    def clear_cache(self) -> None:
        """Drop every cached tensor and reset the counters (as the seed did)."""
        with self._lock:
            entries = len(self._cache)
            self._cache.clear()
            self._bytes = 0
            logger.info(
                "cleared the INT4 cache (%d entries; hits %d, misses %d, evictions %d)",
                entries,
                self._hits,
                self._misses,
                self._evictions,
            )
            self._hits = self._misses = self._evictions = 0

    def get_cache_stats(self) -> dict[str, int | float | None]:
        """``size`` (entries), ``hits``, ``misses``, ``hit_rate``, ``bytes``, ``max_bytes``, ``evictions``."""
        with self._lock:
            lookups = self._hits + self._misses
            return {
                "size": len(self._cache),
                "hits": self._hits,
                "misses": self._misses,
                "hit_rate": self._hits / lookups if lookups else 0.0,
                "bytes": self._bytes,
                "max_bytes": self._max_bytes,
                "evictions": self._evictions,
            }

    # ------------------------------------------------------------------------------------------- for modeling

    def get_dense(self, key: Hashable, weight: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``weight`` dequantized to ``dtype`` (default: the scale's), from the cache when present.

        The entry is keyed by ``(key, dtype)`` and recomputed if ``weight``'s tensors are not the ones it was made
        from. The returned tensor is shared with the cache: do not modify it in place.
        """
        dtype = dtype or weight.dtype
        cache_key = (key, dtype)
        token = _token(weight.tensors())
        cached = self._lookup(cache_key, token)
        if cached is not None:
            return cached
        dense = dequantize(weight, dtype)
        self._store(cache_key, dense, token)
        return dense

    @property
    def max_cache_bytes(self) -> int | None:
        return self._max_bytes

    def set_max_cache_bytes(self, max_cache_bytes: int | None) -> None:
        """Change the budget, evicting least recently used entries until the cache fits."""
        max_cache_bytes = _checked_budget(max_cache_bytes)
        with self._lock:
            self._max_bytes = max_cache_bytes
            self._evict_until(0)

    # --------------------------------------------------------------------------------------------- internals

    def _lookup(self, key: tuple, token: tuple) -> torch.Tensor | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry[1] == token:
                self._cache.move_to_end(key)
                self._hits += 1
                return entry[0]
            self._misses += 1
            return None

    def _count_miss(self) -> None:
        with self._lock:
            self._misses += 1

    def _store(self, key: tuple, dense: torch.Tensor, token: tuple) -> None:
        size = dense.numel() * dense.element_size()
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= old[0].numel() * old[0].element_size()
            if self._max_bytes is not None and size > self._max_bytes:
                logger.debug("not caching %s: %d bytes exceed the whole budget of %d", key, size, self._max_bytes)
                return
            self._evict_until(size)
            self._cache[key] = (dense, token)
            self._bytes += size

    def _evict_until(self, incoming: int) -> None:
        """Evict least recently used entries until ``incoming`` more bytes fit (caller holds the lock)."""
        if self._max_bytes is None:
            return
        while self._cache and self._bytes + incoming > self._max_bytes:
            _, (dense, _) = self._cache.popitem(last=False)
            self._bytes -= dense.numel() * dense.element_size()
            self._evictions += 1


def _weight_from_arrays(packed_weights, scales, zero_points, group_size) -> Int4Weight:
    """The seed's loose arrays -> canonical; int32 words take the compressed-tensors reader."""
    if isinstance(packed_weights, torch.Tensor) and packed_weights.dtype == torch.int32 and packed_weights.dim() == 2:
        out_features, words = packed_weights.shape
        tensors = {
            "weight_packed": packed_weights,
            "weight_scale": scales,
            "weight_shape": torch.tensor([out_features, 8 * words]),
        }
        if zero_points is not None:
            is_packed = (
                zero_points.dtype == torch.int32 and zero_points.dim() == 2 and zero_points.shape[0] != out_features
            )
            tensors["weight_zero_point"] = zero_points if is_packed else zero_points.to(torch.int8)
        return from_compressed_tensors(tensors, "packed_weights", group_size)
    return from_uint8(packed_weights, scales, zero_points, group_size, name="packed_weights")


def _checked_budget(max_cache_bytes: int | None) -> int | None:
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise ConfigError(
            f"INT4Unpacker: max_cache_bytes must be >= 0 or None (unbounded), got {max_cache_bytes} "
            "(model.cache_budget_mb in a config)"
        )
    return max_cache_bytes


def _token(tensors: dict[str, torch.Tensor]) -> tuple:
    """Identity of the source tensors: data pointer, shape and in-place version counter of each (views share their
    base's counter), so a replaced or modified weight is unpacked again. Best effort: ``force=True`` or
    :meth:`INT4Unpacker.clear_cache` after swapping weights in ways this cannot see."""
    return tuple(sorted((key, t.data_ptr(), t._version, tuple(t.shape)) for key, t in tensors.items() if t is not None))


_GLOBAL: INT4Unpacker | None = None
_GLOBAL_LOCK = threading.Lock()


def get_unpacker() -> INT4Unpacker:
    """The process-wide unpacker (created on first use, unbounded unless given a budget)."""
    global _GLOBAL
    with _GLOBAL_LOCK:
        if _GLOBAL is None:
            _GLOBAL = INT4Unpacker()
        return _GLOBAL


def unpack_int4_weights(
    packed_weights: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    group_size: int | None = None,
    output_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """:meth:`INT4Unpacker.unpack_int4_weights` on the global unpacker."""
    return get_unpacker().unpack_int4_weights(packed_weights, scales, zero_points, group_size, output_dtype)


def unpack_module(
    module: torch.nn.Module, module_name: str, force: bool = False, output_dtype: torch.dtype = torch.float16
) -> torch.Tensor | None:
    """:meth:`INT4Unpacker.unpack_module` on the global unpacker."""
    return get_unpacker().unpack_module(module, module_name, force, output_dtype)


def is_int4_quantized(module: torch.nn.Module) -> bool:
    """:meth:`INT4Unpacker.is_int4_quantized` on the global unpacker."""
    return get_unpacker().is_int4_quantized(module)


def clear_cache() -> None:
    """:meth:`INT4Unpacker.clear_cache` on the global unpacker."""
    get_unpacker().clear_cache()


def get_cache_stats() -> dict[str, int | float | None]:
    """:meth:`INT4Unpacker.get_cache_stats` on the global unpacker."""
    return get_unpacker().get_cache_stats()
