"""Print the largest |ours - peft| per model family (logits, adapter gradients, 5 AdamW losses).

    python -m tests.lora.peft_diff_report [--device cuda] [--dtype bfloat16]

The same builders as the tests; on another device/dtype the base is moved before adapters are added.
"""
from __future__ import annotations

import argparse
import warnings

import torch

from lora import add_lora, lora_parameters
from lora.inject import adapter_tensors
from tests.lora.conftest import (FAMILIES, VARIANTS, base_model, batch, our_config, peft_config, peft_trainable,
                                 randomize_both)


def pair(family, cfg, device, dtype):
    from peft import get_peft_model
    ours, ref = (base_model(family).to(device=device, dtype=dtype) for _ in range(2))
    torch.manual_seed(1)
    add_lora(ours, cfg)
    torch.manual_seed(1)
    pm = get_peft_model(ref, peft_config(family, cfg))
    return ours, pm


def measure(family: str, variant: str, device: str, dtype: torch.dtype) -> dict[str, float]:
    cfg = our_config(family, **VARIANTS[variant])
    ours, pm = pair(family, cfg, device, dtype)
    mine, theirs = adapter_tensors(ours), peft_trainable(pm)
    init = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    randomize_both(ours, pm)
    inputs = {k: v.to(device) for k, v in batch(family).items()}
    out, ref = ours(**inputs), pm(**inputs)
    logits = (out.logits.float() - ref.logits.float()).abs().max().item()
    out.loss.backward()
    ref.loss.backward()
    grads = max((mine[k].grad - theirs[k].grad).abs().max().item() for k in mine)
    opt_a = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = 0.0
    for step in range(5):
        pair_losses = []
        for model, opt in ((ours, opt_a), (pm, opt_b)):
            opt.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            pair_losses.append(loss.item())
        losses = max(losses, abs(pair_losses[0] - pair_losses[1]))
    return {"init": init, "logits": logits, "grads": grads, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore")
    print(f"device={args.device} dtype={args.dtype}; max |ours - peft| over variants {list(VARIANTS)}")
    print(f"{'family':8s} {'init':>10s} {'logits':>10s} {'grads':>10s} {'5 losses':>10s}")
    for family in FAMILIES:
        rows = [measure(family, v, args.device, dtype) for v in VARIANTS]
        worst = {k: max(r[k] for r in rows) for k in rows[0]}
        print(f"{family:8s} " + " ".join(f"{worst[k]:10.2e}" for k in ("init", "logits", "grads", "losses")))


if __name__ == "__main__":
    main()
