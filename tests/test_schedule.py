"""lowmem's schedules equal transformers' get_scheduler, step for step."""

import pytest
import torch
from transformers import get_scheduler

from lowmem.schedule import learning_rate, warmup_steps

HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total,ratio", [(20, 0.0), (37, 0.1), (10, 0.5)])
def test_schedule_equals_transformers(kind, total, ratio):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    hf = get_scheduler(HF_NAMES[kind], optimizer, num_warmup_steps=warmup_steps(total, ratio),
                       num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        hf.step()
    ours = [learning_rate(step, 0.5, total, ratio, kind) for step in range(total)]
    assert ours == pytest.approx(expected, abs=1e-12)


def test_warmup_rounds_up_like_hf():
    assert warmup_steps(37, 0.1) == 4 and warmup_steps(10, 0.0) == 0
