"""The architecture registry itself: every family builds, survives save_pretrained/from_pretrained
and runs at the matrix's sizes in transformers, so a config that a transformers upgrade breaks
fails here, not as a bogus exporter failure in the matrix."""

from __future__ import annotations

import pytest
import torch

from tests.architectures import ARCHITECTURES, KINDS, SIZES, VOCAB


def test_registry_covers_every_kind():
    assert len(ARCHITECTURES) >= 32
    assert {a.kind for a in ARCHITECTURES} == set(KINDS)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_builds_and_runs_at_both_sizes(arch, tmp_path):
    config = arch.config()
    assert getattr(config, "vocab_size", VOCAB) == VOCAB
    pad = getattr(config, "pad_token_id", None)
    assert pad is None or 0 <= pad < VOCAB
    arch.build().save_pretrained(tmp_path)
    model = arch.load(tmp_path)
    for batch, seq in SIZES:
        inputs = arch.inputs(model, batch, seq)
        with torch.no_grad():
            output = model(**inputs)[arch.output]
        assert output.shape[0] == batch and torch.isfinite(output).all()
        again = arch.inputs(model, batch, seq)  # seeded: the same inputs every time
        assert all(torch.equal(inputs[k], again[k]) for k in inputs)
