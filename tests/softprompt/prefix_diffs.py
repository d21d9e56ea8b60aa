"""Largest max-abs difference between our prefix tuning and peft's, per family (a report, not a test).

    python -m tests.softprompt.prefix_diffs     # prints a markdown table

For each family and task, with and without the projection: logits and loss on a right-padded
batch, every gradient (prefix encoder and head copy), and the losses of five AdamW steps in
train mode; the table keeps the largest value over the two configurations.
"""
from __future__ import annotations

import torch

from softprompt import PrefixConfig
from tests.softprompt.prefix_pairs import (CAUSAL, SEQ_CLS, build_prefix_pair, labels_for, max_abs,
                                           peft_encoder_params, peft_head_params, ragged_batch)


def measure(family: str, task: str, projection: bool) -> dict[str, float]:
    ours, ref = build_prefix_pair(family, PrefixConfig(n_virtual=4, projection=projection), task=task)
    data = ragged_batch()
    labels = labels_for(task, data)
    out, ref_out = ours(**data, labels=labels), ref(**data, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    ref_params = {**peft_encoder_params(ref), **{f"head.{k}": v for k, v in peft_head_params(ref).items()}}
    ours_params = {**dict(ours.prefix_encoder.named_parameters()),
                   **({f"head.{k}": v for k, v in ours.head.named_parameters()} if ours.head else {})}
    grads = max(max_abs(p.grad, ref_params[n].grad) for n, p in ours_params.items())
    ours.train()
    ref.train()
    opt = torch.optim.AdamW(ours.adapter_parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    steps = 0.0
    for step in range(5):
        pair = []
        for model, optim in ((ours, opt), (ref, ref_opt)):
            optim.zero_grad()
            torch.manual_seed(step)
            loss = model(**data, labels=labels).loss
            loss.backward()
            optim.step()
            pair.append(loss)
        steps = max(steps, max_abs(*pair))
    return {"logits": max_abs(out.logits, ref_out.logits), "loss": max_abs(out.loss, ref_out.loss),
            "grads": grads, "adamw_losses": steps}


def main() -> None:
    print("| family | task | logits | loss | gradients | 5 AdamW losses |")
    print("|---|---|---:|---:|---:|---:|")
    for task, families in (("causal_lm", CAUSAL), ("seq_cls", SEQ_CLS)):
        for family in families:
            runs = [measure(family, task, projection) for projection in (False, True)]
            worst = {k: max(r[k] for r in runs) for k in runs[0]}
            print(f"| {family} | {task} | {worst['logits']:.1e} | {worst['loss']:.1e} | {worst['grads']:.1e} | "
                  f"{worst['adamw_losses']:.1e} |")


if __name__ == "__main__":
    main()
