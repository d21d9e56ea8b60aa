"""The loop over a generic adapted module: accumulation, fp16 GradScaler, NaN stop, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import classify_examples, collator, instruct_examples, toy_causal, toy_classifier
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.config import LoopConfig
from train.loop import NonFiniteLossError, train


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_batch_8_equals_8_accumulated_micro_batches(tmp_path):
    # causal labels of different lengths: the per-token mean must survive accumulation
    ex = instruct_examples(32)
    results = []
    for bs, acc in ((8, 1), (1, 8), (2, 4)):
        model = toy_causal(dropout=0.0)
        train(model, ex, collator(), LoopConfig(steps=3, batch_size=bs, grad_accum=acc, progress=False),
              tmp_path / f"{bs}x{acc}", lr=1e-2)
        results.append(_trainable(model))
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], atol=1e-6, rtol=1e-6)
    before = _trainable(toy_causal(dropout=0.0))
    assert any(not torch.equal(before[n], results[0][n]) for n in before)  # it did train


def test_only_trainable_parameters_change(tmp_path):
    model = toy_classifier()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, classify_examples(16), collator(), LoopConfig(steps=2, batch_size=4, progress=False),
          tmp_path, lr=1e-2)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_fp16_autocast_uses_the_grad_scaler_and_skips_overflow(tmp_path):
    model = toy_causal(dropout=0.0)
    dtypes = []
    model.backbone.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    calls = {"n": 0}

    def overflow_once(grad):  # the first backward overflows: the scaler must skip that update
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad
    model.up.weight.register_hook(overflow_once)
    start = _trainable(model)
    cfg = LoopConfig(steps=1, batch_size=4, precision="fp16", progress=False)
    train(model, instruct_examples(8), collator(), cfg, tmp_path / "a", lr=1e-2)
    assert dtypes and dtypes[0] == torch.float16  # autocast ran the matmuls in fp16 on CPU
    for n, p in _trainable(model).items():
        assert torch.equal(p, start[n]), n  # step skipped, no inf/NaN written into the weights
    state = json.loads((latest_checkpoint(tmp_path / "a") / "state.json").read_text())
    assert state["scaler"]["scale"] == 2.0 ** 15  # halved from 2**16 after the overflow
    cfg = LoopConfig(steps=3, batch_size=4, precision="fp16", progress=False)
    train(model, instruct_examples(8), collator(), cfg, tmp_path / "b", lr=1e-2)
    after = _trainable(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], start[n]) for n in start)


def test_bf16_autocast_trains(tmp_path):
    model = toy_classifier()
    r = train(model, classify_examples(16), collator(),
              LoopConfig(steps=2, batch_size=4, precision="bf16", progress=False), tmp_path, lr=1e-2)
    assert r.steps == 2 and all(p.dtype == torch.float32 for p in _trainable(model).values())


class _NanAfter(torch.nn.Module):
    def __init__(self, inner, after: int):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, **batch):
        out = self.inner(**batch)
        self.calls += 1
        if self.calls > self.after:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _NanAfter(toy_causal(), after=2)
    # loss="full": the wrapper poisons the model's own .loss (the labelled loss never reads it)
    cfg = LoopConfig(steps=5, batch_size=4, save_every=1, progress=False, loss="full")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*step-00000002"):
        train(model, instruct_examples(16), collator(), cfg, tmp_path, lr=1e-2)
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-00000002"
    saved = load_file(last / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "checkpoints" / "step-00000003").exists()


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    model = toy_causal()
    train(model, instruct_examples(16), collator(), LoopConfig(steps=2, batch_size=4, progress=False),
          tmp_path, lr=1e-2)
    expected_rng = torch.get_rng_state()
    other = toy_causal()
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1.0)
    torch.manual_seed(123)
    state = load_checkpoint(latest_checkpoint(tmp_path), other, opt)
    assert state["step"] == 2 and state["loop"]["batch_size"] == 4
    for n, p in _trainable(model).items():
        assert torch.equal(dict(other.named_parameters())[n], p)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # the last update's lr (linear decay)
    assert all(int(s["step"]) == 2 for s in opt.state.values()) and len(opt.state) == 2
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_bad_loop_inputs(tmp_path):
    with pytest.raises(ValueError, match="lr=0.0; expected a positive"):
        train(toy_causal(), instruct_examples(8), collator(), LoopConfig(steps=1, progress=False), tmp_path, lr=0.0)
    with pytest.raises(ValueError, match="batch_size=16 exceeds the 8 examples"):
        train(toy_causal(), instruct_examples(8), collator(), LoopConfig(steps=1, progress=False), tmp_path, lr=1e-3)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(toy_causal(), instruct_examples(8), collator(), LoopConfig(steps=1, batch_size=2, progress=False),
              tmp_path / "fresh", lr=1e-3, resume=True)
    with pytest.raises(ValueError, match="steps=0; expected an integer > 0"):
        LoopConfig(steps=0)
    with pytest.raises(ValueError, match="precision='fp8'"):
        LoopConfig(precision="fp8")


def test_gradient_checkpointing_with_a_frozen_lora_base(tmp_path):
    import lora
    from tests.models import tiny_causal_lm
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = lora.add_lora(tiny_causal_lm("llama"), lora.LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
        with torch.no_grad():  # B = 0 at init: give the adapters a value so their gradients flow both ways
            for p in lora.lora_parameters(model):
                p.add_(0.05)
        train(model, instruct_examples(16), collator(),
              LoopConfig(steps=2, batch_size=4, grad_checkpointing=gc, progress=False), tmp_path / str(gc), lr=1e-2)
        assert model.is_gradient_checkpointing == gc
        results.append(_trainable(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-6, rtol=1e-6)


def test_eval_every_and_metrics_lines(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"eval_loss": 1.0, "accuracy": 0.5}
    train(toy_classifier(), classify_examples(16), collator(),
          LoopConfig(steps=4, batch_size=4, eval_every=2, log_every=1, progress=False), tmp_path, lr=1e-2,
          evaluate=evaluate)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [2]  # the final score is the caller's
    assert calls == [False]  # evaluated in eval mode
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in lines if r["kind"] == "train")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_checkpoint_loads_by_name_into_a_model_that_registers_its_parameters_in_another_order(tmp_path):
    """A checkpoint numbers optimizer states in its own parameter order; loading maps them by name."""
    from train.checkpoint import save_checkpoint

    class AB(torch.nn.Module):
        def __init__(self, first: str):
            super().__init__()
            shapes = {"a": (3, 2), "b": (5,)}
            for name in (first, "b" if first == "a" else "a"):
                self.register_parameter(name, torch.nn.Parameter(torch.zeros(shapes[name])))

    src = AB("a")
    with torch.no_grad():
        src.a.copy_(torch.arange(6.0).view(3, 2))
        src.b.copy_(torch.arange(5.0) + 10)
    opt = torch.optim.AdamW(src.parameters(), lr=0.1)
    src.a.grad, src.b.grad = torch.ones(3, 2), torch.full((5,), 2.0)
    opt.step()
    folder = save_checkpoint(tmp_path, 1, src, opt, None, {})
    dst = AB("b")
    assert [n for n, _ in dst.named_parameters()] == ["b", "a"]
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=0.1)
    load_checkpoint(folder, dst, dst_opt)
    assert torch.equal(dst.a, src.a) and torch.equal(dst.b, src.b)
    for name in ("a", "b"):
        ours, theirs = dst_opt.state[getattr(dst, name)], opt.state[getattr(src, name)]
        assert torch.equal(ours["exp_avg"], theirs["exp_avg"]) and torch.equal(ours["exp_avg_sq"], theirs["exp_avg_sq"])
