"""Print the largest |ours - peft| per method and model family (init, logits, adapter gradients,
5 AdamW losses): LoRA (its variants), LoRA on embeddings with rank/alpha patterns and layer
selection, and IA3.

    python -m tests.lora.peft_diff_report [--device cuda] [--dtype bfloat16]

The same builders as the tests; on another device/dtype the base is moved before adapters are added.
"""
from __future__ import annotations

import argparse
import warnings

import torch

from lora import IA3Config, add_ia3, add_lora, lora_parameters
from lora.inject import adapter_tensors
from tests.lora.conftest import (FAMILIES, VARIANTS, base_model, batch, our_config, peft_config, peft_trainable,
                                 randomize_both)


def pair(family, cfg, device, dtype):
    from peft import IA3Config as PeftIA3Config, get_peft_model
    ours, ref = (base_model(family).to(device=device, dtype=dtype) for _ in range(2))
    torch.manual_seed(1)
    if isinstance(cfg, IA3Config):
        add_ia3(ours, cfg)
        peft_cfg = PeftIA3Config(task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM")
    else:
        add_lora(ours, cfg)
        peft_cfg = peft_config(family, cfg)
    torch.manual_seed(1)
    pm = get_peft_model(ref, peft_cfg)
    return ours, pm


def configs(method: str, family: str) -> list:
    """The configs measured for one method on one family."""
    if method == "lora":
        return [our_config(family, **VARIANTS[v]) for v in VARIANTS]
    if method == "ia3":
        return [IA3Config(modules_to_save=("classifier",) if family == "bert" else ())]
    from tests.lora.test_embedding_patterns import VARIANTS as EMB, config
    return [config(family, v) for v in EMB]


def measure(family: str, cfg, device: str, dtype: torch.dtype) -> dict[str, float]:
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
    print(f"device={args.device} dtype={args.dtype}; max |ours - peft| (lora: over variants {list(VARIANTS)}; "
          f"embedding: embedding LoRA, rsLoRA, rank/alpha patterns, layers_to_transform)")
    print(f"| method | family | init | logits | grads | 5 losses |\n|---|---|---:|---:|---:|---:|")
    for method in ("lora", "embedding", "ia3"):
        for family in FAMILIES:
            rows = [measure(family, cfg, args.device, dtype) for cfg in configs(method, family)]
            worst = {k: max(r[k] for r in rows) for k in rows[0]}
            print(f"| {method} | {family} | " + " | ".join(f"{worst[k]:.2e}" for k in ("init", "logits", "grads", "losses"))
                  + " |")


if __name__ == "__main__":
    main()
