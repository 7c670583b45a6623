"""The one-batch-ahead device prefetch (sd_train.data.prefetch) as the loader drives it: the same
batches in the same order, batch N+1 staged before batch N is handed out, and a data position
that counts only the batches handed out, so a checkpoint taken with one batch staged resumes
exactly. On CPU a recording stager stands in for the CUDA side stream; the CPU default stages nothing."""

from __future__ import annotations

from itertools import islice

import torch

from sd_train.data.prefetch import NO_STAGING, stager_for
from tests.support.streams import keys_of, make_loader, take


class RecordingStager:
    """Stages one ahead like CudaStager, marking each batch and logging the order of the calls."""

    lookahead = 1

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def stage(self, batch: dict) -> dict:
        self.log.append(("stage", batch["keys"][0]))
        return {**batch, "staged": True}

    def ready(self, batch: dict) -> dict:
        self.log.append(("ready", batch["keys"][0]))
        return batch


def test_cpu_default_stages_nothing() -> None:
    assert stager_for(torch.device("cpu")) is NO_STAGING and NO_STAGING.lookahead == 0
    assert make_loader().stager is NO_STAGING


def test_same_batches_in_order_with_the_next_one_staged_first() -> None:
    reference = list(make_loader(max_epochs=2))
    loader = make_loader(max_epochs=2)
    loader.stager = stager = RecordingStager()
    got = list(loader)
    assert keys_of(got) == keys_of(reference) and len(got) == len(reference) > 10
    for a, b in zip(got, reference):
        assert a["staged"] and torch.equal(a["pixels"], b["pixels"]) and a["position"] == b["position"]
    first = [b["keys"][0] for b in got]
    # stage 0, stage 1, ready 0, stage 2, ready 1, ..., ready last
    expected = [("stage", first[0])]
    for i, key in enumerate(first):
        if i + 1 < len(first):
            expected.append(("stage", first[i + 1]))
        expected.append(("ready", key))
    assert stager.log == expected
    assert loader.state_dict() == make_loader_state_after(reference_len=len(reference), max_epochs=2)


def make_loader_state_after(reference_len: int, max_epochs: int) -> dict:
    loader = make_loader(max_epochs=max_epochs)
    assert len(list(loader)) == reference_len
    return loader.state_dict()


def test_position_counts_handed_out_batches_and_resumes_exactly() -> None:
    total, cut = 20, 7  # the cut lands mid-epoch 0; the tail crosses two epoch boundaries
    reference_loader = make_loader()
    it = iter(reference_loader)
    head_ref = list(islice(it, cut))
    state_ref = reference_loader.state_dict()
    tail_ref = list(islice(it, total - cut))
    it.close()

    staged = make_loader()
    staged.stager = stager = RecordingStager()
    it = iter(staged)
    head = list(islice(it, cut))
    # batch cut+1 was staged before batch cut was handed out ...
    assert stager.log[-2:] == [("stage", tail_ref[0]["keys"][0]), ("ready", head_ref[-1]["keys"][0])]
    assert staged.state_dict() == state_ref  # ... and not counted in the position
    state = staged.state_dict()
    it.close()
    assert keys_of(head) == keys_of(head_ref)

    resumed = make_loader()
    resumed.stager = RecordingStager()
    resumed.load_state_dict(state)
    tail = take(resumed, total - cut)
    assert keys_of(tail) == keys_of(tail_ref)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(head + tail, head_ref + tail_ref))
