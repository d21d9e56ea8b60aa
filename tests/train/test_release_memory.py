"""`LoopConfig.release_memory`: when the loop hands a CPU step's freed heap back to the OS."""
from __future__ import annotations

import pytest
import torch

import train.loop as loop_module
from lora import LoRAConfig, add_lora, quantize_model
from tests.models import VOCAB, tiny_causal_lm
from train import LoopConfig
from train.loop import train
from train.memory import RELEASE_MODES, releases_each_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def lora_model(four_bit: bool) -> torch.nn.Module:
    backbone = tiny_causal_lm("llama")
    if four_bit:
        quantize_model(backbone, skip=("lm_head",), blocksize=64, compute_dtype=torch.float32)
    return add_lora(backbone, LoRAConfig(r=4, alpha=8))


def test_policy_per_mode_and_device():
    dense, packed = lora_model(False), lora_model(True)
    assert any(p.dtype == torch.uint8 for p in packed.parameters())
    assert releases_each_step("step", dense, CPU) and releases_each_step("step", packed, CPU)
    assert not releases_each_step("never", dense, CPU) and not releases_each_step("never", packed, CPU)
    assert releases_each_step("auto", packed, CPU)       # QLoRA: memory first
    assert not releases_each_step("auto", dense, CPU)    # dense: no refault cost every step
    for mode in RELEASE_MODES:                           # the CUDA caching allocator is not glibc's heap
        assert not releases_each_step(mode, packed, CUDA)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="release_memory='always'"):
        releases_each_step("always", torch.nn.Linear(2, 2), CPU)
    with pytest.raises(ValueError, match=r"release_memory='always'; expected one of \('auto', 'step', 'never'\)"):
        LoopConfig(release_memory="always")


@pytest.mark.parametrize("mode, four_bit, expected", [("auto", False, 0), ("auto", True, 3), ("step", False, 3),
                                                       ("never", True, 0)])
def test_loop_releases_after_each_step_as_configured(mode, four_bit, expected, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop_module, "release_freed_memory", lambda: calls.append(1) or True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
    examples = [{"input_ids": row, "labels": row.clone()} for row in ids]

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    cfg = LoopConfig(steps=3, batch_size=2, lr=1e-3, device="cpu", progress=False, log_every=1,
                     release_memory=mode)
    train(lora_model(four_bit), examples, collate, cfg, tmp_path / "run", 1e-3)
    assert len(calls) == expected
