"""Every family of the architecture registry, exported with shardex's defaults and compared in
plain ONNX Runtime with transformers at two input sizes other than the export's example.

One test per family: decoders (the KV-cache step, fed an empty past), MoE decoders, encoders,
vision towers, encoder-decoders, speech and a state-space model. Each also checks that one ONNX
function exists per distinct block group, called once per block. The default suite runs one
family of each kind; `-m slow` runs them all (`scripts/arch_matrix.py` puts the same families
beside plain torch.onnx.export and transformers' own exporter).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import shardex
from tests.architectures import ARCHITECTURES, SIZES
from tests.onnx_support import session, step_feeds

pytestmark = pytest.mark.usefixtures("ray_local")

REPRESENTATIVE = {"llama", "mixtral", "bert", "modernbert", "vit", "t5"}  # each kind (and hole attributes)
ATOL = 1e-4


def cases() -> list:
    return [
        pytest.param(arch, id=arch.name, marks=() if arch.name in REPRESENTATIVE else pytest.mark.slow)
        for arch in ARCHITECTURES
    ]


@pytest.mark.parametrize("arch", cases())
def test_family_exports_and_matches_transformers(arch, tmp_path):
    ckpt = tmp_path / "ckpt"
    arch.build().save_pretrained(ckpt)
    out = tmp_path / "out"
    shardex.export(ckpt, out, verify_tokens=4)

    manifest = shardex.load_manifest(out)
    assert manifest["verification"]["passed"]
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    groups = manifest["plan"]["groups"]
    assert len(proto.functions) == len(groups)  # one function per distinct block ...
    calls = [n for n in proto.graph.node if n.domain == "shardex.blocks"]
    assert len(calls) == sum(len(g["members"]) for g in groups)  # ... called once per block

    reference = arch.load(ckpt)
    sess = session(out / "model.onnx")
    for batch, seq in SIZES:
        inputs = arch.inputs(reference, batch, seq)
        with torch.no_grad():
            expected = reference(**inputs)[arch.output].numpy()
        if manifest["plan"]["task"] == "text-generation-with-past":
            ids = inputs["input_ids"].numpy()
            feeds = step_feeds(sess, ids, np.ones_like(ids))  # the first step: an empty past
        else:
            feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
        actual = sess.run(None, feeds)[0]
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() <= ATOL, (batch, seq)
