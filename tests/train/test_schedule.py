"""Our step-function schedules equal transformers' LambdaLR schedules update by update."""
from __future__ import annotations

import pytest
import torch
import transformers

from train.schedule import lr_factor


@pytest.mark.parametrize("kind,ref", [
    ("linear", transformers.get_linear_schedule_with_warmup),
    ("cosine", transformers.get_cosine_schedule_with_warmup),
    ("constant", lambda opt, w, t: transformers.get_constant_schedule_with_warmup(opt, w)),
])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(kind, ref, warmup):
    total = 20
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = ref(opt, warmup, total)
    ours, theirs = [], []
    for step in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(lr_factor(step, total, warmup, kind))
        opt.step()
        sched.step()
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_unknown_kind():
    with pytest.raises(ValueError, match="expected linear, cosine or constant"):
        lr_factor(5, 10, 0, "step")
