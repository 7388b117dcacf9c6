"""The frozen input embedding table in (pinned) host memory.

The input embedding of a Llama-3 model is ``128256 x hidden`` in bf16: 2.1 GiB at the 70B shape, 1.05 GiB at the 8B
shape, and only ``tokens x hidden`` of it is read per forward. :func:`enable_host_embeddings` keeps the table on the
host and patches the module's forward::

    ids (device) -> ids on the host -> rows gathered on the host into a pinned buffer -> copy to the device
                    (one small sync)                                                     (non_blocking)

The output is the same tensor the module computed before (a gather is exact), on the compute device, not requiring
grad; hooks on the module (PEFT / transformers' ``enable_input_require_grads``, which sets ``requires_grad`` on the
output) keep working.

The table leaves the module's parameters: ``module.weight`` still reads it (a frozen ``nn.Parameter`` on the host,
held as a plain attribute), but ``model.parameters()``, ``state_dict()`` and ``model.to(device)`` no longer see it,
so accelerate's device placement and DDP (which wants every parameter on one device type) leave it alone.
:func:`disable_host_embeddings` puts it back on the compute device as a parameter; do that before writing the whole
model from memory (``save_pretrained``, :mod:`int4lora_train.export.merge`), which would leave the table out.

Refused (:class:`HostEmbeddingError`, with the reason) for an embedding that trains (LoRA on it,
``modules_to_save``, ``requires_grad``), that is tied to the output head (``tie_word_embeddings``: the head needs
the table on the device every step), or whose class has its own forward (e.g. a scaled embedding).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_DEVICE = "_int4lora_host_embedding_device"


class HostEmbeddingError(ValueError):
    """The input embedding cannot be kept in host memory (the message says why)."""


def input_embedding(model: nn.Module) -> nn.Module | None:
    """``model``'s input embedding module (``get_input_embeddings()``), or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def host_embedding_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s input embedding cannot be kept on the host, or None when it can."""
    embed = input_embedding(model)
    if embed is None:
        return "the model has no input embedding (get_input_embeddings)"
    if _DEVICE in embed.__dict__:
        return None
    if type(embed).__name__ == "ModulesToSaveWrapper" or hasattr(embed, "modules_to_save"):
        return "the input embedding is trained (PEFT modules_to_save)"
    if hasattr(embed, "lora_embedding_A") or hasattr(embed, "base_layer"):
        return "the input embedding carries an adapter (LoRA on embed_tokens)"
    if type(embed).forward is not nn.Embedding.forward or not isinstance(embed, nn.Embedding):
        return f"the input embedding ({type(embed).__name__}) has its own forward"
    weight = embed.weight
    if weight.requires_grad:
        return "the input embedding is trainable (requires_grad)"
    config = getattr(model, "config", None)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_weight = getattr(head, "weight", None) if head is not None else None
    tied = getattr(config, "tie_word_embeddings", False)
    if isinstance(head_weight, torch.Tensor) and head_weight.device.type != "meta" and weight.device.type != "meta":
        tied = tied or head_weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    if tied:
        return "the input embedding is tied to the output head (tie_word_embeddings)"
    return None


def _host_embedding_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    weight = self.weight  # the host table
    device = self.__dict__[_DEVICE]
    ids = input_ids.to(weight.device)
    if self.max_norm is None:
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=weight.is_pinned())
        torch.index_select(weight, 0, flat, out=out)
        out = out.view(*ids.shape, weight.shape[1])
    else:
        out = F.embedding(
            ids, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
    return out.to(device, non_blocking=out.is_pinned())


def enable_host_embeddings(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Keep ``model``'s input embedding table in host memory (see the module docstring); returns the module. The
    output goes to ``device`` (default: where the table is now). Calling it again changes nothing.

    Raises:
        HostEmbeddingError: the embedding cannot be kept on the host (:func:`host_embedding_refusal` says why).
    """
    reason = host_embedding_refusal(model)
    if reason is not None:
        raise HostEmbeddingError(reason)
    embed = input_embedding(model)
    if _DEVICE in embed.__dict__:
        return embed
    weight = embed.weight
    compute_device = torch.device(device) if device is not None else weight.device
    host = weight.detach().to("cpu", copy=weight.device.type == "cpu")
    if compute_device.type == "cuda":  # pinned: the copies to the device run asynchronously
        host = host.pin_memory()
    del embed._parameters["weight"]
    embed.__dict__["weight"] = nn.Parameter(host, requires_grad=False)
    embed.__dict__[_DEVICE] = compute_device
    embed.forward = types.MethodType(_host_embedding_forward, embed)
    logger.info(
        "input embedding in host memory (%s): %.2f GiB off %s",
        "pinned" if host.is_pinned() else "pageable",
        host.numel() * host.element_size() / 2**30,
        compute_device,
    )
    return embed


def disable_host_embeddings(model: nn.Module) -> bool:
    """Undo :func:`enable_host_embeddings`: the table goes back to the compute device as a parameter; returns
    whether it was on the host."""
    embed = input_embedding(model)
    if embed is None or _DEVICE not in embed.__dict__:
        return False
    device = embed.__dict__.pop(_DEVICE)
    host = embed.__dict__.pop("weight")
    embed.__dict__.pop("forward", None)
    embed.weight = nn.Parameter(host.detach().to(device), requires_grad=False)
    return True


def host_embeddings_enabled(model: nn.Module) -> bool:
    """Whether ``model``'s input embedding is kept in host memory."""
    embed = input_embedding(model)
    return embed is not None and _DEVICE in embed.__dict__
