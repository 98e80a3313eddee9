"""group_by_modality_length: every optimizer step's samples share a modality (but for one mixed
group of leftovers per epoch), each epoch covers every sample once, and the order is a pure function
of (seed, epoch) so a resumed stream continues exactly."""
import pytest
import torch

from mmgpt_engine.train.batches import ModalityGroupedSampler


def _lengths(n_image=53, n_text=27, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (torch.randint(5, 90, (n_image,), generator=g) + 16).tolist()
    text = (-torch.randint(3, 60, (n_text,), generator=g)).tolist()
    order = torch.randperm(n_image + n_text, generator=g).tolist()
    both = image + text
    return [both[i] for i in order]


def _steps(lengths, micro, world, accum, epochs=2, start=0):
    group = micro * world * accum
    samplers = [ModalityGroupedSampler(lengths, group, micro, r, world, seed=7, start=start) for r in range(world)]
    iters = [iter(s) for s in samplers]
    n_steps = epochs * (-(-len(lengths) // group))
    steps = []
    for _ in range(n_steps):
        step = []
        for _ in range(accum):
            for it in iters:
                step += next(it)
        steps.append(step)
    return steps


@pytest.mark.parametrize("n_text", [27, 30])  # 80 samples: whole groups of 8; 83: the last one topped up
def test_each_step_holds_one_modality_and_each_epoch_every_sample(n_text):
    lengths = _lengths(n_text=n_text)
    micro, world, accum = 2, 2, 2
    steps = _steps(lengths, micro, world, accum)
    n, group = len(lengths), micro * world * accum
    per_epoch = -(-n // group)
    mixed = 0
    for step in steps:
        kinds = {lengths[i] > 0 for i in step}
        mixed += len(kinds) > 1
    assert mixed <= 2  # the group where the leftovers of the two kinds meet, once an epoch
    flat = [i for step in steps[:per_epoch] for i in step]
    assert set(flat) == set(range(n)) and len(flat) == per_epoch * group
    full_groups = [s for s in steps if len({lengths[i] > 0 for i in s}) == 1]
    for step in full_groups:  # longest first within a group: each micro-batch pads little
        sizes = [abs(lengths[i]) for i in step]
        assert sizes == sorted(sizes, reverse=True)


def test_the_order_resumes_exactly_from_a_position():
    lengths = _lengths()
    whole = _steps(lengths, 2, 2, 1, epochs=2)
    resumed = _steps(lengths, 2, 2, 1, epochs=1, start=8 * 4)  # after 8 steps of 4 samples
    assert resumed[: len(whole) - 8] == whole[8: 8 + len(resumed)]


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match=r"group: expected a positive multiple of micro x world \(4\), got 6"):
        ModalityGroupedSampler([1, -1, 2, -2], 6, 2, 0, 2, seed=0)
    with pytest.raises(ValueError, match="lengths: expected non-zero lengths"):
        ModalityGroupedSampler([1, 0], 2, 1, 0, 1, seed=0)
