"""Layer graphs (``speed.layer_graphs``): each checkpointed decoder layer's forward and recompute + backward captured
once and replayed, with the same losses and gradients as torch's checkpoint, dropout included.

On the CPU the graphs are :class:`EagerReplay` (the captured function run again at each replay: every buffer, copy
and generator rule of the real graphs, without CUDA); with ``INT4LORA_TEST_DEVICE=cuda`` they are CUDA graphs under
bf16 autocast, on the flash varlen kernel for packed rows.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from modeling_helpers import tiny_int4_lora_model

from int4lora_train import speed
from int4lora_train.memory.offload import checkpointed_layers
from int4lora_train.modeling import prepare_for_training
from int4lora_train.speed import layer_graphs as lg
from int4lora_train.speed import varlen_attention as va

DEVICE = torch.device(os.environ.get("INT4LORA_TEST_DEVICE", "cpu"))
CAPTURE = lg.CudaGraphCapture if DEVICE.type == "cuda" else lg.EagerReplay
LAYERS = 3


@pytest.fixture(autouse=True)
def _fresh_cache():
    va.clear_cache()
    yield
    va.clear_cache()


def _model(dropout: float, packed: bool, graphs: bool, capture=CAPTURE):
    model = tiny_int4_lora_model("llama", lora_dropout=dropout, sizes={"num_hidden_layers": LAYERS}).to(DEVICE)
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    speed.apply(model, packed_attention="varlen" if packed else "mask", packed=packed, device=DEVICE)
    model.train()
    state = lg.enable_layer_graphs(model, DEVICE, capture=capture) if graphs else None
    return model, state


def _batch(step: int, packed: bool, rows: int = 2, length: int = 16, segments: int = 3) -> dict:
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 256, (rows, length), generator=gen)
    if packed:  # each row: `segments` samples, positions restarting at 0
        cuts = sorted(torch.randperm(length - 1, generator=gen)[: segments - 1].add(1).tolist())
        pos = torch.cat([torch.arange(b - a) for a, b in zip([0, *cuts], [*cuts, length])])
        position_ids = pos.expand(rows, -1).clone()
    else:
        position_ids = torch.arange(length).expand(rows, -1).clone()
    return {"input_ids": ids.to(DEVICE), "position_ids": position_ids.to(DEVICE), "labels": ids.to(DEVICE)}


def _train(model, batches: list[dict], after_step=None) -> tuple[list[float], list[dict]]:
    """Loss and LoRA gradients of each step (AdamW in place between them), the dropout seeded once;
    ``after_step()`` is called after each."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(7)
    losses, grads = [], []
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda")
    for batch in batches:
        with autocast:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    return losses, grads


def _assert_same(reference, graphed):
    (losses0, grads0), (losses1, grads1) = reference, graphed
    assert losses0 == losses1
    for step, (g0, g1) in enumerate(zip(grads0, grads1)):
        assert g0.keys() == g1.keys()
        differ = [n for n in g0 if not torch.equal(g0[n], g1[n])]
        assert not differ, f"step {step + 1}: {differ[:3]}"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_replays_give_torch_checkpoints_losses_and_gradients(dropout, packed):
    batches = [_batch(k, packed) for k in range(3)]
    reference = _train(_model(dropout, packed, graphs=False)[0], batches)
    model, graphs = _model(dropout, packed, graphs=True)
    _assert_same(reference, _train(model, batches))
    assert graphs.stats == {"captures": 1, "graphed_calls": 3 * LAYERS, "eager_calls": 0}
    if dropout:
        assert any(g.abs().max() > 0 for g in reference[1][0].values())


def test_layer_zero_input_gradient_when_the_embeddings_need_one():
    """With the input embeddings' output requiring grad (reentrant-style set-up) every layer computes its input
    gradient; the graphs of layer 0 are captured for it."""
    batches = [_batch(k, True) for k in range(2)]

    def train(graphs: bool):
        model, state = _model(0.1, True, graphs)
        model.enable_input_require_grads()
        return _train(model, batches), state

    reference, _ = train(False)
    graphed, state = train(True)
    _assert_same(reference, graphed)
    assert state.layers[0].needs_input_grad and state.layers[0].grad_in is not None


def test_eval_between_steps_runs_the_layers_as_they_are_and_keeps_the_graphs():
    """transformers checkpoints (so graphs) only when training with gradients: an evaluation between steps runs the
    layers plainly; the next step replays the graphs of the first."""
    batches = [_batch(k, True) for k in range(3)]

    def run(graphs: bool):
        model, state = _model(0.1, True, graphs)
        first = _train(model, batches[:1])
        model.eval()
        with torch.no_grad():
            evaluated = model(**batches[1], use_cache=False).loss.item()
        model.train()
        return first, evaluated, _train(model, batches[1:]), state

    first0, evaluated0, rest0, _ = run(False)
    first1, evaluated1, rest1, state = run(True)
    _assert_same(first0, first1)
    _assert_same(rest0, rest1)
    assert evaluated0 == evaluated1
    assert state.stats == {"captures": 1, "graphed_calls": 3 * LAYERS, "eager_calls": 0}


def test_a_new_shape_captures_again_and_after_max_captures_the_layers_run_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(lg, "MAX_CAPTURES", 2)
    batches = [_batch(0, True, length=16), _batch(1, True, length=12), _batch(2, True, length=20)]
    reference = _train(_model(0.1, True, graphs=False)[0], batches)
    model, graphs = _model(0.1, True, graphs=True)
    with caplog.at_level(logging.INFO, logger=lg.__name__):
        _assert_same(reference, _train(model, batches))
    assert graphs.stats == {"captures": 2, "graphed_calls": 2 * LAYERS, "eager_calls": LAYERS}
    assert "after 2 captures" in caplog.text


def test_segments_go_into_a_buffer_of_fixed_capacity_grown_by_doubling(monkeypatch):
    monkeypatch.setattr(lg, "MIN_SEGMENT_CAPACITY", 4)
    batches = [_batch(0, True, segments=3), _batch(1, True, segments=2), _batch(2, True, segments=5)]
    reference = _train(_model(0.0, True, graphs=False)[0], batches)
    model, graphs = _model(0.0, True, graphs=True)
    seen = []

    def record():
        cu = graphs.captured.segments.cu_seqlens
        seen.append((graphs.stats["captures"], cu.tolist()))

    _assert_same(reference, _train(model, batches, record))
    # 2 rows x 3 segments, then 2 x 2: both fit a capacity of 8; then 2 x 5 = 10 need 16 (captured again)
    assert [(captures, len(cu) - 1) for captures, cu in seen] == [(1, 8), (1, 8), (2, 16)]
    assert seen[1][1][4:] == [32] * 5  # 4 real segments, then empty ones ending where the tokens end


def test_a_failed_capture_is_an_error_naming_the_setting():
    """torch leaves CUDA in capture mode after a failed capture, so there is no eager fallback: a clear error."""
    from int4lora_train.errors import TrainingError

    class FailSecond(lg.EagerReplay):
        def __call__(self, fn, before_run):
            if self.captures == 1:  # layer 1's forward
                raise RuntimeError("operation not permitted when stream is capturing")
            return super().__call__(fn, before_run)

    model, _ = _model(0.1, True, graphs=True, capture=FailSecond)
    with pytest.raises(TrainingError, match=r"decoder layer 1's forward .*operation not permitted.*cuda_graphs: off"):
        _train(model, [_batch(0, True)])


def test_enable_needs_checkpointing_and_disable_restores_torchs_checkpoint():
    model = tiny_int4_lora_model("llama")
    with pytest.raises(ValueError, match="gradient checkpointing"):
        lg.enable_layer_graphs(model, "cpu")
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    layers = checkpointed_layers(model)
    originals = [m._gradient_checkpointing_func for m in layers]
    graphs = lg.enable_layer_graphs(model, "cpu", capture=lg.EagerReplay)
    assert lg.layer_graphs(model) is graphs
    assert all(m._gradient_checkpointing_func is not o for m, o in zip(layers, originals))
    assert lg.disable_layer_graphs(model) and not lg.disable_layer_graphs(model)
    assert [m._gradient_checkpointing_func for m in layers] == originals


def test_auto_is_on_only_where_graphs_can_run_and_on_names_what_stops_them():
    from int4lora_train.errors import ConfigError
    from int4lora_train.memory.offload import enable_activation_offload

    model = tiny_int4_lora_model("llama")
    assert speed.apply(model, cuda_graphs="auto", device="cpu")["cuda_graphs"] is False
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device.*train.speed.cuda_graphs: auto"):
        speed.apply(model, cuda_graphs="on", device="cpu")
    with pytest.raises(ConfigError, match="cuda_graphs must be one of"):
        speed.apply(model, cuda_graphs="sometimes")
    assert "no gradient-checkpointed decoder layer" in " ".join(lg.graph_blockers(model, torch.device("cpu")))
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=False)
    assert lg.graph_blockers(model, torch.device("cpu"), need_cuda=False) == []
    assert lg.set_layer_graphs(model, "on", "cpu", capture=lg.EagerReplay) and lg.layer_graphs(model) is not None
    assert not lg.set_layer_graphs(model, "off") and lg.layer_graphs(model) is None
    enable_activation_offload(model, include_cpu=True)
    assert "activation offloading" in " ".join(lg.graph_blockers(model, torch.device("cpu"), need_cuda=False))
    assert not lg.set_layer_graphs(model, "auto", "cpu", capture=lg.EagerReplay)


def test_the_trainer_graphs_the_layers_last_and_on_fails_clearly_without_cuda(tmp_path):
    """``train.speed.cuda_graphs`` through the trainer: ``auto`` is off on the CPU (logged), ``on`` is a ConfigError
    before the first step."""
    from int4lora_train.errors import ConfigError
    from int4lora_train.train.config import SpeedConfig, TrainConfig
    from int4lora_train.train.module import LoraModule
    from int4lora_train.train.trainer import Trainer

    config = TrainConfig(micro_batch_size=1, max_steps=1, speed=SpeedConfig(cuda_graphs="on"))
    trainer = Trainer(config, run_dir=tmp_path / "run", device="cpu", tensorboard=False, progress_bar=False)
    module = LoraModule(tiny_int4_lora_model("llama"), config)
    with pytest.raises(ConfigError, match="cuda_graphs: on cannot work here: CUDA graphs need a CUDA device"):
        trainer.prepare_model(module, [], 1)


def test_auto_leaves_large_micro_batches_eager(caplog):
    """``max_tokens`` (``auto``: AUTO_MAX_TOKENS): a bigger micro-batch runs under torch's checkpoint, captures
    nothing, and trains the same."""
    batches = [_batch(0, True, rows=1), _batch(1, True, rows=2)]  # 16 tokens, then 32
    reference = _train(_model(0.1, True, graphs=False)[0], batches)
    model = _model(0.1, True, graphs=False)[0]
    graphs = lg.enable_layer_graphs(model, DEVICE, capture=CAPTURE, max_tokens=16)
    with caplog.at_level(logging.INFO, logger=lg.__name__):
        _assert_same(reference, _train(model, batches))
    assert graphs.stats == {"captures": 1, "graphed_calls": LAYERS, "eager_calls": LAYERS}
    assert "micro-batches of more than 16 tokens" in caplog.text
    assert lg.AUTO_MAX_TOKENS == 2048
