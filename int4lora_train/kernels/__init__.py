"""The Triton kernels, the one switch that picks them over the torch references, and how they are launched.

::

    backend.py        use_triton(device, choice): the one backend selector; INT4LORA_KERNELS, the one escape hatch
    launch.py         KernelLaunch, Replay, DirectLauncher: launches with less host work (Triton internals, with
                      the ordinary kernel[grid] as fallback)
    dequantizer.py    an Int4Linear's dequantizer: TorchDequantizer / TritonDequantizer (prepared launch) /
                      CachedDequantizer, chosen by select_dequantizer
    dequant.py        Triton: INT4 dequantization (the torch reference is int4lora_train.quant.dequant)
    grouped_dequant.py  Triton: the used MoE experts' INT4 dequantization in one launch (the torch reference is
                      int4lora_train.quant.experts.dequantize_experts_torch)
    norm_mlp.py       Triton: RMSNorm and SwiGLU, forward and backward (used by int4lora_train.speed.fused_ops)
    cross_entropy.py  Triton: row-wise cross-entropy and its gradient (used by int4lora_train.speed.chunked_loss)

The Triton modules import ``triton`` (an optional dependency) and are imported only where :func:`use_triton` chose
them; everything else here imports without it.
"""

from int4lora_train.kernels.backend import ENV_VAR, triton_available, use_triton

__all__ = ["ENV_VAR", "triton_available", "use_triton"]
