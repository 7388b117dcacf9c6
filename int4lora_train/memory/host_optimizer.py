"""AdamW with its state in host memory: the LoRA optimizer state (and its update) off the device.

AdamW keeps two fp32 tensors per trainable parameter (``exp_avg``, ``exp_avg_sq``): for LoRA r 16 on all seven
projections of the Llama-3-70B shape that is 2 x 0.77 GiB on the device for the whole run, more than the checkpointed
activations at 2048 tokens. :class:`HostAdamW` keeps them in pinned host memory and runs the update there::

    step:  parameters and gradients  device -> host   (non-blocking copies into persistent pinned buffers, one sync)
           torch.optim.AdamW.step on the host copies   (the same arithmetic as on the device, in fp32)
           updated parameters          host -> device  (non-blocking; the next forward is ordered after them)

The device holds what it held before (the parameters and, between backward and step, their gradients); the host
holds the state and one fp32 copy of each parameter and gradient. The parameters on the device stay the source of
truth: each step copies them to the host first, so loading an adapter or a checkpoint into the model needs no extra
call. ``state_dict()`` / ``load_state_dict()`` are AdamW's (keys, shapes and dtypes), so checkpoints move between
this optimizer and :class:`torch.optim.AdamW` both ways.

Cost: the copies (3 x the LoRA bytes per step over PCIe / C2C) and the host update (memory-bound, a few tenths of a
second for 200M parameters on a server CPU): worth it only where the device memory decides what fits.
"""

from __future__ import annotations

from typing import Any

import torch

_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class HostAdamW(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` whose state and update live in host memory (see the module docstring).

    Takes AdamW's arguments. ``param_groups`` hold the model's (device) parameters, as for AdamW, so LR schedulers,
    gradient clipping and accelerate's wrapper see an ordinary optimizer.
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        for name in ("foreach", "fused", "capturable"):
            if kwargs.get(name):
                raise ValueError(f"HostAdamW runs its update on the host: {name}=True does not apply")
        super().__init__(params, **kwargs)
        self._host: dict[torch.Tensor, torch.Tensor] = {}  # device parameter -> its host copy (with .grad)

    def _host_copy(self, param: torch.Tensor) -> torch.Tensor:
        copy = self._host.get(param)
        if copy is None:
            pin = param.device.type == "cuda"
            copy = torch.empty(param.shape, dtype=param.dtype, pin_memory=pin)
            copy.grad = torch.empty(param.shape, dtype=param.dtype, pin_memory=pin)
            self._host[param] = copy
        return copy

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        device_groups, copies = [], []
        for group in self.param_groups:
            device_groups.append(group["params"])
            with_grad = [p for p in group["params"] if p.grad is not None]
            host = []
            for param in with_grad:
                copy = self._host_copy(param)
                copy.copy_(param, non_blocking=True)
                copy.grad.copy_(param.grad, non_blocking=True)
                host.append(copy)
                if param in self.state:
                    self.state[copy] = self.state.pop(param)
            copies.append(list(zip(with_grad, host)))
            group["params"] = host
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copies are complete
        try:
            super().step()
        finally:
            for group, params, pairs in zip(self.param_groups, device_groups, copies):
                group["params"] = params
                for param, copy in pairs:
                    if copy in self.state:
                        self.state[param] = self.state.pop(copy)
        for pairs in copies:
            for param, copy in pairs:
                param.copy_(copy, non_blocking=True)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """AdamW's ``load_state_dict`` (which puts the state on each parameter's device), then the state to the host."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for name in _STATE_TENSORS:
                value = state.get(name)
                if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    state[name] = value.to("cpu").pin_memory() if param.device.type == "cuda" else value.to("cpu")

    def host_bytes(self) -> int:
        """Bytes this optimizer holds in host memory (state + parameter and gradient copies)."""
        total = sum(2 * c.numel() * c.element_size() for c in self._host.values())
        for state in self.state.values():
            total += sum(state[n].numel() * state[n].element_size() for n in _STATE_TENSORS if n in state)
        return total
