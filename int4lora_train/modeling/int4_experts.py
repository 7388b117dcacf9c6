"""``Int4Experts``: a mixture-of-experts block's experts with INT4 weights, in transformers 5's fused layout.

transformers 5 keeps a MoE layer's experts as one module holding ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first,
then up) and ``down_proj`` ``[E, H, I]``, called as ``experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`` by the model's own sparse-MoE block (router, top-k, shared expert stay
transformers'). :class:`Int4Experts` takes its place with the same call and the same math, holding the weights as
INT4 stacks (:class:`~int4lora_train.quant.experts.Int4ExpertStack`): packed uint8 ``[E, out, in/2]``, scales
``[E, out, G]``, optional int8 zero points. No dense copy of an expert is ever kept.

**Symmetry per projection.** A checkpoint may quantize an expert's gate symmetrically and its up asymmetrically (or
the reverse: compressed-tensors config groups give each target its own scheme). The fused ``gate_up`` stack then
holds zeros as the symmetric half's zero points, which dequantize exactly as no zero points do and let one
dequantization (one ``HAS_ZERO_POINTS`` grouped launch) cover both halves. Those zeros are not the checkpoint's:
``gate_up_symmetric`` records which half has none, so :meth:`Int4Experts.expert_int4_weights` gives each projection
back as stored and the base fingerprint of the model equals that of the checkpoint directory.

::

    (token, slot) pairs sorted by expert (stable)      x_s = hidden_states[token]               [T*K, H]
    gate_up = grouped(x_s, gate_up stack)              one dequantization of the USED experts    [T*K, 2I]
    h = act(gate) * up                                                                          [T*K, I]
    y = grouped(h, down stack) * top_k_weight                                                   [T*K, H]
    out = zeros[T, H].index_add_(0, token, y)          each token's experts summed in expert order

``grouped`` is :class:`Int4ExpertsLinearFunction`: it dequantizes the experts that received tokens (at most
``max_dense_experts`` at a time, one grouped launch each on the Triton path) into a ``[n, out, in]`` temporary,
multiplies each expert's contiguous rows, and saves for backward only the packed stacks (references, no copies)
and the routing (the expert ids, their row counts and cumulative row offsets). Backward dequantizes again for
``grad_x = grad_y @ W_e``; no weight gradient exists (the base is frozen and has no weight parameter).

Optional per-expert LoRA (``lora``: :class:`ExpertLora`) adds ``s * (x @ A_e.T) @ B_e.T`` to each projection with
``A_gate``, ``A_up [E, r, H]``, ``B_gate``, ``B_up [E, I, r]``, ``A_down [E, r, I]``, ``B_down [E, H, r]`` (plain autograd
through the segment matmuls). The PEFT layer that owns those parameters is
:class:`int4lora_train.modeling.expert_lora.Int4ExpertsLora`.

**Two implementations of the per-expert matmuls** (``Int4Experts.experts_impl``; the same math):

- ``"grouped"``: one grouped GEMM (``torch.nn.functional.grouped_mm``, else ``torch._grouped_mm``) per
  dequantization chunk: ``x_sorted [rows, K] @ W [n, K, N]`` with ``offs`` = the chunk's cumulative row counts
  (int32, on the device; ``W`` is the chunk's dequantized buffer or its transposed view). The LoRA gathers the used
  experts' A and B (``A.index_select(0, ids)``, differentiable) and runs two grouped matmuls per projection through
  torch's own autograd of ``_grouped_mm``. It runs where :func:`grouped_mm_supported` says so (CUDA: sm80+ with
  torch >= 2.9, sm90 only before, as transformers' ``grouped_mm`` experts check, bfloat16 being the CUTLASS path;
  CPU: torch >= 2.9's kernel; float32 / bfloat16 / float16, each confirmed by a one-time probe) and where every
  operand's row stride is a multiple of 16 bytes (:func:`grouped_mm_aligned`: hidden size, expert width and LoRA
  rank times the element size).
- ``"loop"``: one ``torch.matmul`` per used expert and projection, and two per expert for each LoRA projection
  (:func:`_segment_lora`): the behaviour before the grouped path; it runs everywhere.
- ``"auto"`` (the default): the grouped path where it runs, else the loop, decided per call and per projection.

**Host syncs.** One per layer forward: the per-expert row counts are read to the host once (``counts``), because
the chunking by ``max_dense_experts`` and the loop path need them as Python ints. The expert ids, the row offsets
and the number of routed slots are derived on the device or from those counts; backward reuses them from the
saved spec (no sync). Gradient checkpointing's recompute is a forward and reads them once more. That holds for
torch's grouped GEMM only where it is a real grouped kernel: on CUDA, bf16 on sm90/sm100 (the CUTLASS path); torch's
fallback (fp16/fp32, or other compute capabilities such as sm80) copies ``offs`` to the host and loops over the
groups, one more sync per grouped GEMM, forward and backward.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from int4lora_train.errors import Int4FormatError, UnsupportedFormatError
from int4lora_train.quant.experts import Int4ExpertStack, dequantize_experts
from int4lora_train.quant.layout import Int4Weight

logger = logging.getLogger(__name__)

STACKS = ("gate_up", "down")
"""The two projections of every expert, by the prefix of their buffers (transformers' ``gate_up_proj`` /
``down_proj``)."""

EXPERTS_IMPLS = ("auto", "grouped", "loop")
"""Values of ``Int4Experts.experts_impl`` (see the module docstring)."""

_GROUPED_MM_ALIGNMENT = 16
"""Bytes: grouped GEMM kernels (CUDA's CUTLASS path, and the CPU kernel) need every non-unit stride and the data
pointers of both operands to be multiples of this."""


def _grouped_mm_op():
    """``torch.nn.functional.grouped_mm`` (torch >= 2.10), else ``torch._grouped_mm`` (torch >= 2.8), else None."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _grouped_mm_probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the grouped GEMM once on tiny operands of ``device`` / ``dtype`` (one of them an empty group) and compare
    with per-group matmuls: a kernel that is missing, refuses the dtype or computes something else says False."""
    op = _grouped_mm_op()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(24, 16, generator=gen).to(device=device, dtype=dtype)
            w = torch.randn(3, 16, 32, generator=gen).to(device=device, dtype=dtype)
            offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
            got = op(x, w, offs=offs)
            want = torch.cat([x[:8] @ w[0], x[8:] @ w[2]])
            return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
    except Exception as exc:  # noqa: BLE001 - any refusal means "not here"; the loop path runs instead
        logger.debug("grouped_mm unavailable on %s for %s: %s", device, dtype, exc)
        return False


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped GEMM runs for ``dtype`` operands on ``device`` in this torch build.

    CUDA: compute capability 8.0+ with torch >= 2.9 and 9.x (Hopper) before, as transformers 5's
    ``_can_use_grouped_mm`` checks. bfloat16 is the dtype torch documents and the one that takes the CUTLASS kernel
    on sm90; torch 2.11 also accepts float16 and float32 there (seen on an H200, exact against per-group matmuls;
    not the CUTLASS kernel), so those are taken where the probe passes. CPU: torch >= 2.9 (no CPU kernel before). Both then run a
    one-time probe (:func:`_grouped_mm_probe`, cached per device and dtype) so that a build without the kernel falls
    back to the loop instead of failing mid-training.
    """
    if _grouped_mm_op() is None or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if not ((major, minor) >= (8, 0) if torch.__version__ >= "2.9" else major == 9):
            return False
        device = torch.device("cuda", index)
    elif device.type == "cpu":
        if torch.__version__ < "2.9":
            return False
    else:
        return False
    return _grouped_mm_probe(device, dtype)


def grouped_mm_aligned(dtype: torch.dtype, *features: int) -> bool:
    """Whether rows of each width in ``features`` (elements of ``dtype``) are multiples of 16 bytes: then the sorted
    activations, every chunk's row slice of them and the dense expert buffers meet the grouped GEMM's alignment."""
    size = dtype.itemsize
    return all((f * size) % _GROUPED_MM_ALIGNMENT == 0 for f in features)


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x[rows of group g] @ weight[g]`` for ``x [rows, K]``, ``weight [G, K, N]`` (row- or column-major per
    group), ``offs`` int32 cumulative row ends; ``x`` is made contiguous if it is not (an expanded gradient, a
    column slice)."""
    if x.stride(-1) != 1 or (x.dim() == 2 and x.stride(0) != x.shape[1]):
        x = x.contiguous()
    return _grouped_mm_op()(x, weight, offs=offs)


@dataclass(frozen=True)
class _GroupedSpec:
    """The non-tensor half of a grouped projection, passed through autograd."""

    dtype: torch.dtype
    in_features: int
    group_size: int
    counts: tuple[int, ...]  # rows per used expert, in the order of the ids
    backend: str | None
    max_dense_experts: int
    grouped: bool = False  # one grouped GEMM per chunk (needs ``offsets``) instead of a matmul per expert

    def chunks(self):
        """``(first expert slot, end slot, first row, rows)`` per dequantization chunk of ``max_dense_experts``
        experts."""
        row = 0
        for start in range(0, len(self.counts), self.max_dense_experts):
            stop = min(start + self.max_dense_experts, len(self.counts))
            rows = sum(self.counts[start:stop])
            yield start, stop, row, rows
            row += rows


def _stack(packed, scales, zero_points, spec: _GroupedSpec) -> Int4ExpertStack:
    return Int4ExpertStack(packed, scales, spec.in_features, spec.group_size, zero_points)


def _grouped_matmul(x, stack, ids, offsets, spec: _GroupedSpec, transpose: bool) -> torch.Tensor:
    """``x @ W_e.T`` (or ``x @ W_e`` with ``transpose=False``) for each used expert's contiguous rows of ``x``:
    one grouped GEMM per chunk when ``spec.grouped`` (``offsets``: the int32 cumulative row counts of all used
    experts), else one matmul per expert."""
    chunks = list(spec.chunks())
    if spec.grouped and len(chunks) == 1:  # one chunk: the grouped GEMM's result is the output
        out = None
    else:
        out = x.new_empty(x.shape[0], stack.out_features if transpose else stack.in_features)
    for start, stop, row, rows in chunks:
        dense = dequantize_experts(stack, ids[start:stop], spec.dtype, backend=spec.backend)
        weights = dense.transpose(-2, -1) if transpose else dense
        if spec.grouped:
            offs = offsets[start:stop] - row if row else offsets[start:stop]
            result = _grouped_mm(x[row : row + rows], weights, offs)
            if out is None:
                return result
            out[row : row + rows].copy_(result)
            continue
        first = row
        for slot, count in enumerate(spec.counts[start:stop]):
            if count:
                torch.matmul(x[first : first + count], weights[slot], out=out[first : first + count])
            first += count
    return out


class Int4ExpertsLinearFunction(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ W_e.T`` over tokens sorted by expert, saving only packed tensors + routing."""

    @staticmethod
    def forward(ctx, x, packed, scales, zero_points, ids, offsets, spec: _GroupedSpec):
        stack = _stack(packed, scales, zero_points, spec)
        ctx.save_for_backward(packed, scales, zero_points, ids, offsets)
        ctx.spec = spec
        return _grouped_matmul(x, stack, ids, offsets, spec, transpose=True)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed, scales, zero_points, ids, offsets = ctx.saved_tensors
            stack = _stack(packed, scales, zero_points, ctx.spec)
            grad = grad_output.to(ctx.spec.dtype)
            grad_x = _grouped_matmul(grad, stack, ids, offsets, ctx.spec, transpose=False)
        return grad_x, None, None, None, None, None, None


@dataclass(frozen=True)
class ExpertLora:
    """One adapter's per-expert LoRA tensors (see the module docstring), its scaling and input dropout. Gate and up
    have their own A and B, as in checkpoints and vLLM's per-expert adapters."""

    gate_A: torch.Tensor  # [E, r, H]
    gate_B: torch.Tensor  # [E, I, r]
    up_A: torch.Tensor  # [E, r, H]
    up_B: torch.Tensor  # [E, I, r]
    down_A: torch.Tensor  # [E, r, I]
    down_B: torch.Tensor  # [E, H, r]
    scaling: float
    dropout: object = None

    @property
    def rank(self) -> int:
        return self.gate_A.shape[1]


def _segment_lora(x, lora_A, lora_B, ids_list, counts, scaling, dtype) -> torch.Tensor:
    """``s * (x_e @ A_e.T) @ B_e.T`` per used expert's rows, concatenated (autograd reaches A and B): the loop path."""
    parts, first = [], 0
    for expert, count in zip(ids_list, counts):
        rows = x[first : first + count]
        first += count
        parts.append((rows @ lora_A[expert].to(dtype).T) @ lora_B[expert].to(dtype).T)
    return torch.cat(parts) * scaling


def _grouped_lora(x, lora_A, lora_B, ids, offsets, scaling, dtype) -> torch.Tensor:
    """:func:`_segment_lora` as two grouped GEMMs over the used experts' gathered ``A [n, r, in]`` and ``B [n, out,
    r]`` (``index_select``: its backward scatters the gradients back into the ``[E, ...]`` parameters); torch's
    autograd of ``_grouped_mm`` gives the gradients of ``x``, A and B."""
    a = lora_A.index_select(0, ids).to(dtype)
    b = lora_B.index_select(0, ids).to(dtype)
    low = _grouped_mm(x, a.transpose(-2, -1), offsets)  # [rows, r]
    return _grouped_mm(low, b.transpose(-2, -1), offsets) * scaling


class Int4Experts(nn.Module):
    """INT4 experts with transformers 5's experts call (see the module docstring).

    Buffers: ``gate_up_packed`` uint8 ``[E, 2I, H/2]``, ``gate_up_scales`` ``[E, 2I, G_h]``, ``gate_up_zero_points``
    (or None), ``down_packed`` ``[E, H, I/2]``, ``down_scales``, ``down_zero_points``. ``act_fn`` is the replaced
    module's activation. ``max_dense_experts`` bounds how many experts' dense weights one projection dequantizes at
    once (the temporary is ``max_dense_experts * out * in`` elements; default: all used experts at once).
    ``experts_impl`` picks the per-expert matmuls: ``"auto"`` (grouped GEMM where it runs, else the loop),
    ``"grouped"`` (refuses where it cannot run) or ``"loop"`` (see the module docstring); an attribute, so it can be
    switched on a built model. ``gate_up_symmetric`` says, for the gate and the up half of ``gate_up``, whether the
    checkpoint stores that projection without zero points (see "Symmetry per projection" in the module docstring);
    by default both halves are as the stack (symmetric when it has no zero points).
    """

    def __init__(
        self,
        gate_up: Int4ExpertStack,
        down: Int4ExpertStack,
        act_fn,
        compute_dtype: torch.dtype | None = None,
        backend: str | None = None,
        max_dense_experts: int | None = None,
        name: str = "experts",
        projection_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        experts_impl: str = "auto",
        gate_up_symmetric: tuple[bool, bool] | None = None,
    ) -> None:
        super().__init__()
        if gate_up.num_experts != down.num_experts:
            raise Int4FormatError(f"{name}: gate_up has {gate_up.num_experts} experts but down has {down.num_experts}.")
        if gate_up.out_features % 2 or down.in_features != gate_up.out_features // 2:
            raise Int4FormatError(
                f"{name}: gate_up is [{gate_up.out_features}, {gate_up.in_features}] and down "
                f"[{down.out_features}, {down.in_features}] per expert; expected [2I, H] and [H, I]."
            )
        if down.out_features != gate_up.in_features:
            raise Int4FormatError(
                f"{name}: down's output ({down.out_features}) must equal gate_up's input "
                f"({gate_up.in_features}), the hidden size."
            )
        stack_symmetric = gate_up.zero_points is None
        gate_up_symmetric = (stack_symmetric,) * 2 if gate_up_symmetric is None else tuple(gate_up_symmetric)
        if stack_symmetric != all(gate_up_symmetric):
            raise Int4FormatError(
                f"{name}: gate_up is {'symmetric' if stack_symmetric else 'asymmetric'} but gate_up_symmetric is "
                f"{gate_up_symmetric}; a stack has zero points exactly when its gate or its up projection has them."
            )
        self.gate_up_symmetric = gate_up_symmetric
        """(gate, up): whether the checkpoint stores that projection symmetric (no zero points)."""
        self.num_experts = gate_up.num_experts
        self.hidden_dim = gate_up.in_features
        self.intermediate_dim = down.in_features
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.max_dense_experts = max_dense_experts
        self.experts_impl = experts_impl
        self.projection_names = tuple(projection_names)
        """Per-expert (gate, up, down) names in checkpoints and adapters (Mixtral: w1, w3, w2)."""
        self.group_sizes = {"gate_up": gate_up.group_size, "down": down.group_size}
        for prefix, stack in (("gate_up", gate_up), ("down", down)):
            self.register_buffer(f"{prefix}_packed", stack.packed)
            self.register_buffer(f"{prefix}_scales", stack.scales)
            self.register_buffer(f"{prefix}_zero_points", stack.zero_points)

    # ------------------------------------------------------------------------------------------------ weights

    def stack(self, prefix: str) -> Int4ExpertStack:
        """The ``"gate_up"`` or ``"down"`` stack (views of the buffers)."""
        if prefix not in STACKS:
            raise UnsupportedFormatError(f"Int4Experts has stacks {list(STACKS)}, not {prefix!r}.")
        in_features = self.hidden_dim if prefix == "gate_up" else self.intermediate_dim
        return Int4ExpertStack(
            self._buffers[f"{prefix}_packed"],
            self._buffers[f"{prefix}_scales"],
            in_features,
            self.group_sizes[prefix],
            self._buffers[f"{prefix}_zero_points"],
        )

    @property
    def projection_symmetry(self) -> dict[str, bool]:
        """``{projection name: symmetric}`` for the gate, up and down projections, as the checkpoint stores them."""
        gate, up, down = self.projection_names
        return {gate: self.gate_up_symmetric[0], up: self.gate_up_symmetric[1], down: self.down_zero_points is None}

    def expert_int4_weights(self):
        """``(expert, projection name, Int4Weight)`` for every expert's gate, up and down projection, as the
        checkpoint stores them per expert (views of the stacks, no copy; a symmetric half without the zeros that
        ``gate_up`` holds for it): what the base's fingerprint hashes."""
        gate, up, down = self.projection_names
        gate_up, down_stack = self.stack("gate_up"), self.stack("down")
        rows = self.intermediate_dim
        halves = (
            (gate, slice(0, rows), self.gate_up_symmetric[0]),
            (up, slice(rows, 2 * rows), self.gate_up_symmetric[1]),
        )
        for e in range(self.num_experts):
            both = gate_up.expert(e)
            for proj, part, symmetric in halves:
                zero_points = None if symmetric else both.zero_points[part]
                yield e, proj, Int4Weight(both.packed[part], both.scales[part], both.in_features, both.group_size,
                                          zero_points)  # fmt: skip
            yield e, down, down_stack.expert(e)

    def dequantize(self, prefix: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts' dense ``[E, out, in]`` weight of ``prefix`` (transformers' ``gate_up_proj`` / ``down_proj``):
        needs the dense memory, for references and debugging only."""
        stack = self.stack(prefix)
        ids = torch.arange(self.num_experts, device=stack.device)
        return dequantize_experts(stack, ids, dtype, backend=self.backend)

    @property
    def qweight(self) -> torch.Tensor:
        """The gate/up packed stack, under the name PEFT looks up to find a quantized layer's device."""
        return self.gate_up_packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_with_lora(hidden_states, top_k_index, top_k_weights, None)

    def use_grouped_mm(self, device: torch.device, dtype: torch.dtype, *features: int) -> bool:
        """Whether a grouped GEMM computes the projections of ``dtype`` on ``device`` whose row widths are
        ``features`` (see ``experts_impl``); ``"grouped"`` where it cannot run raises with the reason."""
        if self.experts_impl not in EXPERTS_IMPLS:
            raise UnsupportedFormatError(
                f"experts_impl must be one of {list(EXPERTS_IMPLS)}, not {self.experts_impl!r}."
            )
        if self.experts_impl == "loop":
            return False
        supported = grouped_mm_supported(device, dtype)
        aligned = grouped_mm_aligned(dtype, *features)
        if self.experts_impl == "grouped" and not (supported and aligned):
            why = (
                f"torch {torch.__version__} has no grouped GEMM for {dtype} on {device} (CUDA needs bfloat16 on "
                "sm80+ and torch >= 2.9; CPU needs torch >= 2.9)"
                if not supported
                else f"rows of {list(features)} {dtype} elements are not all multiples of {_GROUPED_MM_ALIGNMENT} bytes"
            )
            raise UnsupportedFormatError(f"experts_impl='grouped': {why}; use experts_impl='auto' or 'loop'.")
        return supported and aligned

    def forward_with_lora(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: ExpertLora | None,
    ) -> torch.Tensor:
        """The experts' output ``[T, H]``, with the per-expert LoRA ``lora`` added to both projections when given."""
        if torch.is_autocast_enabled(hidden_states.device.type):
            dtype = torch.get_autocast_dtype(hidden_states.device.type)
        else:
            dtype = self.compute_dtype or hidden_states.dtype
        top_k = top_k_index.shape[-1]
        device = hidden_states.device
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            sorted_experts = flat[order]
            # Index num_experts (or above) marks a slot routed to no local expert (transformers skips it too): those
            # sort last. starts[e] = the first sorted slot of expert >= e, so counts and the number of routed slots
            # come without a boolean mask (each of which would be a host sync).
            bounds = torch.arange(self.num_experts + 1, device=device, dtype=sorted_experts.dtype)
            starts = torch.searchsorted(sorted_experts, bounds)
            counts_all = starts[1:] - starts[:-1]
            counts_host = counts_all.tolist()  # the one host sync of the layer
            ids_list = [e for e, count in enumerate(counts_host) if count]
            counts = tuple(counts_host[e] for e in ids_list)
            # The used experts in increasing order, on the device: experts with tokens sort before those without.
            ids = torch.argsort((counts_all == 0).to(torch.uint8), stable=True)[: len(ids_list)]
            order = order[: sum(counts)]
            token = order // top_k
        final = torch.zeros_like(hidden_states)
        if not counts:
            return final
        x = hidden_states[token].to(dtype)
        chunk = self.max_dense_experts or len(counts)
        base_grouped = self.use_grouped_mm(device, dtype, self.hidden_dim, self.intermediate_dim)
        lora_grouped = lora is not None and self.use_grouped_mm(
            device, dtype, self.hidden_dim, self.intermediate_dim, lora.rank
        )
        offsets = None
        if base_grouped or lora_grouped:
            offsets = torch.cumsum(counts_all.index_select(0, ids), 0, dtype=torch.int32)
        gate_up, down = self.stack("gate_up"), self.stack("down")
        spec_gu = _GroupedSpec(dtype, self.hidden_dim, gate_up.group_size, counts, self.backend, chunk, base_grouped)
        spec_down = _GroupedSpec(
            dtype, self.intermediate_dim, down.group_size, counts, self.backend, chunk, base_grouped
        )

        def delta(inputs, lora_A, lora_B):
            if lora_grouped:
                return _grouped_lora(inputs, lora_A, lora_B, ids, offsets, lora.scaling, dtype)
            return _segment_lora(inputs, lora_A, lora_B, ids_list, counts, lora.scaling, dtype)

        projected = Int4ExpertsLinearFunction.apply(
            x, gate_up.packed, gate_up.scales, gate_up.zero_points, ids, offsets, spec_gu
        )
        if lora is not None:
            xd = lora.dropout(x) if lora.dropout is not None else x
            both = [delta(xd, a, b) for a, b in ((lora.gate_A, lora.gate_B), (lora.up_A, lora.up_B))]
            projected = projected + torch.cat(both, dim=-1)
        gate, up = projected.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = Int4ExpertsLinearFunction.apply(h, down.packed, down.scales, down.zero_points, ids, offsets, spec_down)
        if lora is not None:
            hd = lora.dropout(h) if lora.dropout is not None else h
            y = y + delta(hd, lora.down_A, lora.down_B)
        weights = top_k_weights.reshape(-1)[order]
        y = y * weights[:, None].to(y.dtype)
        return final.index_add(0, token, y.to(final.dtype))

    def extra_repr(self) -> str:
        symmetry = set(self.projection_symmetry.values())
        if len(symmetry) == 1:
            sym = "sym" if symmetry.pop() else "asym"
        else:
            sym = ", ".join(f"{p} {'sym' if s else 'asym'}" for p, s in self.projection_symmetry.items())
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
            f"group_size={self.group_sizes}, {sym}, scales={str(self.gate_up_scales.dtype).removeprefix('torch.')}, "
            f"experts_impl={self.experts_impl}"
        )


def is_fused_experts_module(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``
    parameters (dense, or on the meta device in a loader skeleton)."""
    gate_up = module._parameters.get("gate_up_proj") if hasattr(module, "_parameters") else None
    down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and hasattr(module, "act_fn")
    )
