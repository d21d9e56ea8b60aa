"""The loop's extras: torch.compile gives the eager numbers, TensorBoard events, grad norm and tokens/s."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train.helpers import collator, instruct_examples, toy_causal
from train.config import LoopConfig
from train.loop import train


def _records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_compiled_losses_equal_eager_losses(tmp_path):
    ex = instruct_examples(16)
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = toy_causal(dropout=0.0)
        cfg = LoopConfig(steps=3, batch_size=4, log_every=1, progress=False, compile=compiled)
        train(model, ex, collator(), cfg, tmp_path / str(compiled), lr=1e-2)
        losses[compiled] = [r["loss"] for r in _records(tmp_path / str(compiled))]
    assert len(losses[True]) == 3
    # inductor may fuse and reorder float ops: equal to fp32 rounding, not bitwise
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert losses[False][0] != losses[False][-1]  # it trained


def test_grad_norm_and_tokens_per_second_every_window(tmp_path):
    ex = instruct_examples(16)
    model = toy_causal(dropout=0.0)
    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, **kw):
        norm = orig(params, max_norm, **kw)
        seen.append(float(norm))
        return norm
    torch.nn.utils.clip_grad_norm_ = spy
    try:
        train(model, ex, collator(), LoopConfig(steps=4, batch_size=4, log_every=2, progress=False),
              tmp_path, lr=1e-2)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4]
    # the logged norm is the window's mean of the pre-clipping global norms
    assert recs[0]["grad_norm"] == pytest.approx((seen[0] + seen[1]) / 2, rel=1e-12)
    assert recs[1]["grad_norm"] == pytest.approx((seen[2] + seen[3]) / 2, rel=1e-12)
    for r in recs:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) and r["s_per_step"] > 0


def test_grad_norm_is_logged_without_clipping(tmp_path):
    model = toy_causal(dropout=0.0)
    train(model, instruct_examples(8), collator(),
          LoopConfig(steps=2, batch_size=4, log_every=1, max_grad_norm=0.0, progress=False), tmp_path, lr=1e-2)
    assert all(r["grad_norm"] > 0 for r in _records(tmp_path))


def test_tensorboard_events_hold_the_jsonl_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model = toy_causal(dropout=0.0)
    train(model, instruct_examples(16), collator(),
          LoopConfig(steps=4, batch_size=4, log_every=2, progress=False, log="tensorboard"), tmp_path, lr=1e-2)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/grad_norm", "train/tokens_per_s", "train/lr"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train/loss")
    recs = _records(tmp_path)
    assert [e.step for e in events] == [r["step"] for r in recs]
    # TensorBoard stores float32
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in recs], rel=1e-6)


def test_log_must_be_a_known_backend():
    with pytest.raises(ValueError, match="log='wandb'"):
        LoopConfig(log="wandb")
