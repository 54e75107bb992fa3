"""The embedded default model: small, loadable, and following its control."""

import pytest
import torch

from ecm.data.datasets import ProceduralShapes
from ecm.model.embedded import DEFAULT_DIR, load_default


def test_shipped_files_are_small_fp16_and_load():
    files = sorted(DEFAULT_DIR.glob("*.safetensors"))
    assert len(files) == 3
    assert sum(f.stat().st_size for f in files) <= 30e6
    _, var, ecm = load_default()
    assert torch.count_nonzero(ecm.gates) > 0
    assert var.config.num_classes == len(ProceduralShapes.classes)


@pytest.mark.slow
def test_control_fidelity_beats_the_backbone_threefold():
    from ecm.data.controls import Control
    from ecm.eval.fidelity import evaluate
    from ecm.eval.held_out import ProceduralHeldOut

    vae, var, ecm = load_default()
    control = Control("canny", resolution=vae.config.resolution)
    res = evaluate(var, ecm, ProceduralHeldOut(256, control), control.kind, control.manifest_spec, cfg=1.5,
                   top_k=900, top_p=0.96, temperature="1.0:0.8")
    assert res.ecm >= 3 * res.backbone
