"""mmengine registration: configs build the modules by type name, also through a child registry such
as mmdet's; without mmengine, `import upsampler` still works."""
import os
import subprocess
import sys

import pytest

import lda_aqu.upsampler as upsampler
mmengine = pytest.importorskip("mmengine", reason="the mm extra (pip install lda-aqu[mm]); scripts/test.sh installs it")
from mmengine.registry import MODELS, Registry  # noqa: E402

# mmengine's own modules call torch.jit.script, deprecated in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_build_every_module():
    cfgs = {upsampler.LDAAQU: dict(type="LDAAQU", in_channels=16),
            upsampler.CARAFE: dict(type="CARAFE", channels=16, scale_factor=2, compressed_channels=8),
            upsampler.DySample: dict(type="DySample", in_channels=16, style="pl"),
            upsampler.FPN: dict(type="UpsamplerFPN", in_channels=[8, 16], out_channels=16, upsampler="dysample",
                                upsampler_cfg=dict(groups=2))}
    for cls, cfg in cfgs.items():
        assert type(MODELS.build(cfg)) is cls


def test_child_registry_finds_them_and_keeps_its_own_fpn():
    """mmdet's MODELS is a child of the root with its own "FPN": a lookup tries the child, then the root."""
    child = Registry("model", parent=MODELS, scope="lda_aqu_test_child")

    @child.register_module(name="FPN")
    class ChildFPN:
        def __init__(self, **kw):
            pass

    assert type(child.build(dict(type="FPN"))) is ChildFPN
    neck = child.build(dict(type="UpsamplerFPN", in_channels=[8, 8], out_channels=8, upsampler="carafe",
                            upsampler_cfg=dict(compressed_channels=4)))
    assert type(neck) is upsampler.FPN and type(neck.upsample_modules[0]) is upsampler.CARAFE


def test_import_without_mmengine():
    code = ("import sys; sys.modules['mmengine'] = None\n"
            "import upsampler\n"
            "assert upsampler.register_mmengine() is False and upsampler.DySample(8, groups=2)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
