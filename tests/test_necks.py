"""FPN_LAU (duzw9311/LDA-AQU; mmdet's FPN_CARAFE) and FPN_UPSAMPLE (tiny-smart/detection-with-upsamplers),
the necks of the released detectors: built from their configs, loading the official key sets strictly
out of detector checkpoint files, and against re-derivations of the official forwards (float64, every
backend) on the sizes the official pipelines give and on odd ones."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import backends_under_test, fresh_seed, rel_err, seeded_randn, slow_except
from lda_aqu.upsampler import FPN_LAU, FPN_UPSAMPLE, DySample, neck_state_dict
from lda_aqu.upsampler.official import official_forward, official_state_dict
from lda_aqu.upsampler.plain import carafe_forward, dysample_forward, dysample_init_pos

BACKENDS = tuple(dict.fromkeys(backends_under_test() + ("reference",)))

# the neck configs, as written in configs/lda_aqu/fasterrcnn_r50_lau.py (LDA-AQU),
# faster-rcnn_r50_fpn_dysample-lpg4ds_1x_coco.py (detection-with-upsamplers, with its base's FPN) and
# mmdet's faster-rcnn_r50_fpn-carafe_1x_coco.py
LAU_CFG = dict(type='FPN_LAU', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5,
               start_level=0, end_level=-1, norm_cfg=None, act_cfg=None, order=('conv', 'norm', 'act'),
               upsample_cfg=dict(type='lda_aqu', reduction_factor=4, k_e=3, k_u=3, n_groups=2,
                                 range_factor=11))
UPSAMPLE_CFG = dict(type='FPN_UPSAMPLE', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5,
                    upsample_cfg=dict(type='dysample', guided=False, style='lp', groups=4, dyscope=True))
CARAFE_CFG = dict(in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5, start_level=0, end_level=-1,
                  norm_cfg=None, act_cfg=None, order=('conv', 'norm', 'act'),
                  upsample_cfg=dict(type='carafe', up_kernel=5, up_group=1, encoder_kernel=3, encoder_dilation=1,
                                    compressed_channels=64))


def kwargs(cfg):
    return {k: v for k, v in cfg.items() if k != "type"}


# ---- the official key sets, from the official constructors' names and shapes ----------------------------

def conv(name, c_out, c_in, k):
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def upsampler_shapes(kind, C, cfg):
    """One upsample module's parameters and persistent buffers as the official code builds it at 2x."""
    if kind == "lda_aqu":  # LDA_AQU
        D, G, K, k_e = C // cfg.get("reduction_factor", 4), cfg.get("n_groups", 2), cfg.get("k_u", 3) ** 2, \
            cfg.get("k_e", 3)
        return {"proj_q.weight": (D, C, 1, 1), "proj_k.weight": (D, C, 1, 1), "conv_offset.0.weight": (D // G, 1, 3, 3),
                "conv_offset.1.norm.weight": (D // G,), "conv_offset.1.norm.bias": (D // G,),
                **conv("conv_offset.3", 2 * K, D // G, k_e), "layer_norm.norm.weight": (C,),
                "layer_norm.norm.bias": (C,), "relative_position_bias_table": (1, 1, 1, K, D)}
    if kind == "carafe":  # mmcv CARAFEPack
        m = cfg.get("compressed_channels", 64)
        return {**conv("channel_compressor", m, C, 1),
                **conv("content_encoder", cfg.get("up_kernel", 5) ** 2 * cfg.get("up_group", 1) * 4, m,
                       cfg.get("encoder_kernel", 3))}
    if kind == "deconv":  # nn.ConvTranspose2d: weight (in, out, k, k)
        return {"weight": (C, C, *[cfg.get("upsample_kernel", cfg.get("kernel_size", 3))] * 2), "bias": (C,)}
    if kind == "pixel_shuffle":  # mmcv PixelShufflePack
        return conv("upsample_conv", 4 * C, C, cfg["upsample_kernel"])
    if kind == "pixelshuffle":  # nn.Sequential(Conv2d, PixelShuffle)
        return conv("0", 4 * C, C, cfg.get("kernel_size", 3))
    if kind == "dysample":
        G, pl = cfg.get("groups", 4), cfg.get("style", "lp") == "pl"
        c_in, c_out = (C // 4, 2 * G) if pl else (C, 8 * G)
        shapes = {**conv("offset", c_out, c_in, 1), "init_pos": (1, 8 * G, 1, 1)}
        return {**shapes, **conv("scope", c_out, c_in, 1)} if cfg.get("dyscope") else shapes
    return {}  # nn.Upsample


def backbone_end(n_ins, end_level):
    return n_ins if end_level in (-1, n_ins - 1) else end_level + 1


def fpn_lau_shapes(in_channels, out_channels, num_outs, start_level=0, end_level=-1, upsample_cfg=None, **_):
    cfg = dict(upsample_cfg or dict(type="carafe"))
    kind, C = cfg.pop("type"), out_channels
    used = in_channels[start_level:backbone_end(len(in_channels), end_level)]
    shapes = {}
    for i, c in enumerate(used):
        shapes.update(conv(f"lateral_convs.{i}.conv", C, c, 1))
    for i in range(len(used), num_outs):
        shapes.update(conv(f"lateral_convs.{i}.conv", C, used[-1] if i == len(used) else C, 3))
    for i in range(num_outs):
        shapes.update(conv(f"fpn_convs.{i}.conv", C, C, 3))
    for i in range(num_outs - 1):
        shapes.update({f"upsample_modules.{i}.{k}": s for k, s in upsampler_shapes(kind, C, cfg).items()})
    return shapes


def fpn_upsample_shapes(in_channels, out_channels, num_outs, start_level=0, end_level=-1, add_extra_convs=False,
                        upsample_cfg=None, **_):
    cfg = dict(upsample_cfg or dict(type="nearest"))
    kind, C = cfg.pop("type"), out_channels
    used = in_channels[start_level:backbone_end(len(in_channels), end_level)]
    extra = num_outs - len(used) if add_extra_convs else 0
    shapes = {}
    for i, c in enumerate(used):
        shapes.update(conv(f"lateral_convs.{i}.conv", C, c, 1))
        shapes.update(conv(f"fpn_convs.{i}.conv", C, C, 3))
    for i in range(len(used), len(used) + extra):
        c_in = used[-1] if i == len(used) and add_extra_convs in (True, "on_input") else C
        shapes.update(conv(f"fpn_convs.{i}.conv", C, c_in, 3))
    for i in range(len(used) - 1 + extra):
        shapes.update({f"upsample_modules.{i}.{k}": s for k, s in upsampler_shapes(kind, C, cfg).items()})
    return shapes


def random_state_dict(shapes, upsample_cfg, seed, dtype=torch.float64):
    """Random weights under the official keys: convs at 1/sqrt(fan_in), LDA-AQU's from official.py,
    DySample's offsets of a few pixels, its init_pos as the official buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        fan_in = math.prod(s[1:]) if len(s) > 1 else 1
        sd[k] = seeded_randn(s, generator=g, dtype=dtype) * (fan_in ** -0.5 if len(s) > 1 else 0.3)
    cfg = dict(upsample_cfg)
    kind = cfg.pop("type")
    for i in {int(k.split(".")[1]) for k in sd if k.startswith("upsample_modules.")}:
        p = f"upsample_modules.{i}."
        if kind == "lda_aqu":
            C = shapes[p + "layer_norm.norm.weight"][0]
            lda = official_state_dict(C, r=cfg.get("reduction_factor", 4), G=cfg.get("n_groups", 2),
                                      k_u=cfg.get("k_u", 3), k_e=cfg.get("k_e", 3), seed=seed + i)
            sd.update({p + k: v.to(dtype) for k, v in lda.items()})
        elif kind == "dysample":
            sd[p + "offset.weight"] *= 3
            sd[p + "init_pos"] = dysample_init_pos(2, cfg.get("groups", 4), dtype)
    return sd


# ---- the official forwards, from the state dict -----------------------------------------------------------

def conv_at(sd, name, x, stride=1):
    w = sd[name + ".conv.weight"]
    return F.conv2d(x, w, sd[name + ".conv.bias"], stride, w.shape[-1] // 2)


def official_upsample(kind, cfg, sd, x):
    """The official 2x upsample layer of `kind` (the module's state dict `sd`)."""
    if kind == "lda_aqu":
        return official_forward(sd, x, scale_factor=2, n_groups=cfg.get("n_groups", 2), k_u=cfg.get("k_u", 3),
                                k_e=cfg.get("k_e", 3), range_factor=cfg.get("range_factor", 11))
    if kind == "carafe":
        return carafe_forward(sd, x, scale_factor=2, up_kernel=cfg.get("up_kernel", 5),
                              up_group=cfg.get("up_group", 1), encoder_dilation=cfg.get("encoder_dilation", 1))
    if kind == "dysample":
        return dysample_forward(sd, x, scale=2, style=cfg.get("style", "lp"), groups=cfg.get("groups", 4))
    if kind in ("nearest", "bilinear"):
        return F.interpolate(x, scale_factor=2, mode=kind, align_corners=None if kind == "nearest" else
                             cfg.get("align_corners", False))
    if kind == "deconv" and "upsample_kernel" in cfg:  # mmcv's build_upsample_layer in FPN_LAU
        p = (cfg["upsample_kernel"] - 1) // 2
        return F.conv_transpose2d(x, sd["weight"], sd["bias"], 2, p, p)
    if kind == "deconv":  # detection-with-upsamplers' build_upsampler
        return F.conv_transpose2d(x, sd["weight"], sd["bias"], cfg.get("stride", 2), cfg.get("padding", 1),
                                  cfg.get("output_padding", 1))
    if kind == "pixel_shuffle":
        w = sd["upsample_conv.weight"]
        return F.pixel_shuffle(F.conv2d(x, w, sd["upsample_conv.bias"], padding=(w.shape[-1] - 1) // 2), 2)
    return F.pixel_shuffle(F.conv2d(x, sd["0.weight"], sd["0.bias"], padding=cfg.get("padding", 1)), 2)


def module_sd(sd, i):
    p = f"upsample_modules.{i}."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def fpn_lau_forward(sd, xs, num_outs, start_level=0, end_level=-1, upsample_cfg=None, **_):
    """FPN_LAU.forward: laterals (extra ones 3x3 stride 2 on the last input, then on the previous
    lateral), top-down over all of them with tensor_add (slice_as: crop to the lateral), output convs."""
    cfg = dict(upsample_cfg)
    kind = cfg.pop("type")
    end = backbone_end(len(xs), end_level)
    lat = [conv_at(sd, f"lateral_convs.{i}", x) for i, x in enumerate(xs[start_level:end])]
    src = xs[end - 1]
    while len(lat) < num_outs:
        lat.append(conv_at(sd, f"lateral_convs.{len(lat)}", src, stride=2))
        src = lat[-1]
    for i in range(len(lat) - 1, 0, -1):
        up = official_upsample(kind, cfg, module_sd(sd, i - 1), lat[i])
        assert up.shape[2] >= lat[i - 1].shape[2] and up.shape[3] >= lat[i - 1].shape[3]  # slice_as's
        lat[i - 1] = lat[i - 1] + up[:, :, :lat[i - 1].shape[2], :lat[i - 1].shape[3]]
    return [conv_at(sd, f"fpn_convs.{i}", x) for i, x in enumerate(lat)]


def fpn_upsample_forward(sd, xs, num_outs, start_level=0, end_level=-1, add_extra_convs=False,
                         relu_before_extra_convs=False, upsample_cfg=None, **_):
    """FPN_UPSAMPLE.forward: mmdet's FPN with laterals[i-1] + upsample_modules[i-1](laterals[i])."""
    cfg = dict(upsample_cfg)
    kind = cfg.pop("type")
    cfg.pop("guided", None)
    end = backbone_end(len(xs), end_level)
    lat = [conv_at(sd, f"lateral_convs.{i}", x) for i, x in enumerate(xs[start_level:end])]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + official_upsample(kind, cfg, module_sd(sd, i - 1), lat[i])
    outs = [conv_at(sd, f"fpn_convs.{i}", x) for i, x in enumerate(lat)]
    n = len(outs)
    if not add_extra_convs:
        outs += [None] * (num_outs - n)
        for i in range(n, num_outs):
            outs[i] = F.max_pool2d(outs[i - 1], 1, stride=2)
        return outs
    source = {True: xs[end - 1], "on_input": xs[end - 1], "on_lateral": lat[-1], "on_output": outs[-1]}
    outs.append(conv_at(sd, f"fpn_convs.{n}", source[add_extra_convs], stride=2))
    for i in range(n + 1, num_outs):
        outs.append(conv_at(sd, f"fpn_convs.{i}", F.relu(outs[-1]) if relu_before_extra_convs else outs[-1], 2))
    return outs


# ---- loading the released checkpoints ---------------------------------------------------------------------

def zeros(*shape):
    return torch.zeros(()).expand(shape)  # a one-element storage: full shapes, tiny files


def detector_checkpoint(neck_sd, fmt, mmdet):
    """A Faster R-CNN R50 checkpoint's layout: a handful of the real backbone, RPN and RoI head keys
    and shapes around the neck's."""
    sd = {"backbone.conv1.weight": zeros(64, 3, 7, 7), "backbone.bn1.weight": zeros(64),
          "backbone.bn1.running_mean": zeros(64), "backbone.bn1.num_batches_tracked": torch.tensor(0),
          "backbone.layer1.0.conv1.weight": zeros(64, 64, 1, 1),
          "backbone.layer1.0.downsample.0.weight": zeros(256, 64, 1, 1),
          "backbone.layer4.2.conv3.weight": zeros(2048, 512, 1, 1), "backbone.layer4.2.bn3.bias": zeros(2048)}
    sd.update({f"neck.{k}": v for k, v in neck_sd.items()})
    sd.update({"rpn_head.rpn_conv.weight": zeros(256, 256, 3, 3), "rpn_head.rpn_conv.bias": zeros(256),
               "rpn_head.rpn_cls.weight": zeros(3, 256, 1, 1), "rpn_head.rpn_reg.weight": zeros(12, 256, 1, 1),
               "roi_head.bbox_head.shared_fcs.0.weight": zeros(1024, 12544),
               "roi_head.bbox_head.shared_fcs.1.weight": zeros(1024, 1024),
               "roi_head.bbox_head.fc_cls.weight": zeros(81, 1024),
               "roi_head.bbox_head.fc_reg.weight": zeros(320, 1024)})
    classes = ("person", "bicycle", "car")
    meta = dict(mmdet_version="2.28.2", CLASSES=classes, epoch=12, iter=87960, config="model = dict(...)") \
        if mmdet == 2 else dict(mmengine_version="0.10.3", dataset_meta=dict(classes=classes), epoch=12)
    if fmt == "bare":
        return sd
    if fmt == "dataparallel":
        sd = {"module." + k: v for k, v in sd.items()}
    return {"meta": meta, "state_dict": sd}


RELEASED = {  # name: (neck class, config, mmdet version of the repository, official key set)
    "lda_aqu": (FPN_LAU, LAU_CFG, 2, fpn_lau_shapes),
    "dysample": (FPN_UPSAMPLE, UPSAMPLE_CFG, 3, fpn_upsample_shapes),
    "fpn_carafe": (FPN_LAU, CARAFE_CFG, 2, fpn_lau_shapes),
}


@pytest.mark.parametrize("name,fmt", [("lda_aqu", fmt) for fmt in ("file", "dict", "bare", "dataparallel")] +
                         [("dysample", "file"), ("fpn_carafe", "file")])
def test_released_checkpoint_loads_strictly(tmp_path, name, fmt):
    cls, cfg, mmdet, key_set = RELEASED[name]
    neck = cls(**kwargs(cfg))
    shapes = key_set(**kwargs(cfg))
    g = torch.Generator().manual_seed(fresh_seed())
    saved = {k: seeded_randn(s, generator=g) for k, s in shapes.items()}
    ckpt = detector_checkpoint(saved, fmt, mmdet)
    if fmt != "dict":
        torch.save(ckpt, tmp_path / "detector.pth")
        ckpt = tmp_path / "detector.pth" if fmt == "file" else str(tmp_path / "detector.pth")
    neck.load_state_dict(neck_state_dict(ckpt), strict=True)
    got = neck.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], v) for k, v in saved.items())


def test_official_parameter_count():
    neck = FPN_LAU(**kwargs(LAU_CFG))
    assert [sum(p.numel() for p in m.parameters()) for m in neck.upsample_modules] == [39_410] * 4
    official = sum(math.prod(s) for s in fpn_lau_shapes(**kwargs(LAU_CFG)).values())
    assert sum(p.numel() for p in neck.parameters()) == official == 8_810_952


def test_neck_state_dict_refuses(tmp_path):
    """Checkpoints whose meta pickles other objects (mmengine's may hold numpy scalars) load only with
    weights_only=False."""
    torch.save({"meta": {"seed": np.int64(3)}, "state_dict": {"neck.fpn_convs.0.conv.bias": torch.ones(2)}},
               tmp_path / "c.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        neck_state_dict(tmp_path / "c.pth")
    assert torch.equal(neck_state_dict(tmp_path / "c.pth", weights_only=False)["fpn_convs.0.conv.bias"], torch.ones(2))
    with pytest.raises(ValueError, match="neck"):
        neck_state_dict({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}})
    with pytest.raises(TypeError, match="checkpoint"):
        neck_state_dict(torch.zeros(1))


# ---- the forwards -----------------------------------------------------------------------------------------

IN_CHANNELS = [8, 16, 24, 32]


def pyramid(image, n, seed, in_channels=IN_CHANNELS, batch=2):
    """Backbone maps of strides 4, 8, ... of an image padded to a multiple of 64 ((H, W) given), or, for
    odd sizes, the given finest size halved upwards, as ResNet's stride-2 convs do."""
    sizes, (h, w) = [], ((image[0] // 4, image[1] // 4) if image[0] % 64 == 0 else image)
    for _ in range(n):
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    g = torch.Generator().manual_seed(seed)
    return [seeded_randn(batch, c, *s, generator=g, dtype=torch.float64) for c, s in zip(in_channels, sizes)]


def check(cls, shapes, forward, cfg, xs, backend, seed):
    neck = cls(**cfg, backend=backend).double()
    sd = random_state_dict(shapes(**cfg), cfg["upsample_cfg"], seed)
    neck.load_state_dict(sd, strict=True)
    with torch.no_grad():
        outs = neck(xs)
    ref = forward(sd, xs, **cfg)
    assert len(outs) == len(ref) == cfg["num_outs"]
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.shape == r.shape and rel_err(o, r) < 1e-9, f"level {i}, seed={seed}"


LAU_UPSAMPLERS = {
    "lda_aqu": dict(type="lda_aqu", reduction_factor=4, k_e=3, k_u=3, n_groups=2, range_factor=11),
    "carafe": dict(type="carafe", up_kernel=5, up_group=1, encoder_kernel=3, encoder_dilation=1, compressed_channels=8),
    "nearest": dict(type="nearest"),
    "bilinear": dict(type="bilinear"),
    "deconv": dict(type="deconv", upsample_kernel=3),
    "pixel_shuffle": dict(type="pixel_shuffle", upsample_kernel=3),
}
ON_THE_OP = ("lda_aqu", "carafe", "nearest", "bilinear", "dysample")
# images padded to 64 (strides 4..32 of 128x192) and odd maps, none 1x1 where an LDA_AQU runs (the
# official's q.view fails on the channels-last conv output of a 1x1 map); the Triton interpreter and
# the eager reference, slow, get one small image of each neck's kind, batch 1 (their kernels are
# tested at many sizes elsewhere)
IMAGES = {"padded": (128, 192), "odd": (19, 13)}
SMALL_IMAGES = {"padded": (64, 64), "odd": (17, 9)}
SLOW = ("triton", "reference")


def cases(upsamplers, images):
    for kind in upsamplers:
        for backend in BACKENDS if kind in ON_THE_OP else BACKENDS[:1]:
            for image in images if backend not in SLOW else images[-1:]:
                yield kind, backend, image


def pyramid_for(image, backend, seed):
    if backend in SLOW:
        return pyramid(SMALL_IMAGES[image], 4, seed, batch=1)
    return pyramid(IMAGES[image], 4, seed)


LAU_CASES = list(cases(LAU_UPSAMPLERS, ["padded", "odd"]))
# the fast tier: the odd image of each kind on the torch path (or the kind's one case), LDA-AQU through Triton
LAU_FAST = [c for c in LAU_CASES if c[2] == "odd"
            and (c[1] == "torch" or c[0] not in ON_THE_OP or c[:2] == ("lda_aqu", "triton"))]


@pytest.mark.parametrize("kind,backend,image", slow_except(LAU_CASES, *LAU_FAST))
def test_fpn_lau_matches_official(kind, backend, image):
    """The released config at small widths: P2-P5 laterals, P6 from a stride-2 conv of C5, four
    upsamplers; odd sizes crop each upsampled map to its lateral."""
    seed = fresh_seed()
    cfg = dict(in_channels=IN_CHANNELS, out_channels=16, num_outs=5, upsample_cfg=LAU_UPSAMPLERS[kind])
    check(FPN_LAU, fpn_lau_shapes, fpn_lau_forward, cfg, pyramid_for(image, backend, seed), backend, seed)


@pytest.mark.parametrize("levels", [dict(start_level=1, num_outs=5, upsample="lda_aqu"),
                                    dict(end_level=2, num_outs=3, upsample="nearest"),
                                    dict(num_outs=4, upsample="bilinear"),
                                    dict(start_level=2, num_outs=4, upsample="lda_aqu")],
                         ids=["start1_extra2", "end2", "no_extra", "start2_extra2"])
def test_fpn_lau_levels(levels):
    seed = fresh_seed()
    levels = dict(levels)
    cfg = dict(in_channels=[8, 16, 8, 24], out_channels=8, upsample_cfg=LAU_UPSAMPLERS[levels.pop("upsample")],
               **levels)
    xs = pyramid((40, 36), 4, seed, cfg["in_channels"])
    check(FPN_LAU, fpn_lau_shapes, fpn_lau_forward, cfg, xs, "torch", seed)


UPSAMPLE_UPSAMPLERS = {
    "dysample": dict(type="dysample", guided=False, style="lp", groups=4, dyscope=True),
    "dysample_pl": dict(type="dysample", guided=False, style="pl", groups=2, dyscope=False),
    "carafe": dict(type="carafe", guided=False, compressed_channels=8),
    "nearest": dict(type="nearest", guided=False),
    "bilinear": dict(type="bilinear", guided=False, align_corners=True),
    "deconv": dict(type="deconv", guided=False),
    "pixelshuffle": dict(type="pixelshuffle", guided=False),
}


UPSAMPLE_CASES = list(cases(UPSAMPLE_UPSAMPLERS, ["padded"]))
# the fast tier: each kind on the torch path (or the kind's one case), DySample through Triton
UPSAMPLE_FAST = [c for c in UPSAMPLE_CASES
                 if c[1] == "torch" or c[0] not in ON_THE_OP or c[:2] == ("dysample", "triton")]


@pytest.mark.parametrize("kind,backend,image", slow_except(UPSAMPLE_CASES, *UPSAMPLE_FAST))
def test_fpn_upsample_matches_official(kind, backend, image):
    seed = fresh_seed()
    cfg = dict(in_channels=IN_CHANNELS, out_channels=16, num_outs=5, upsample_cfg=UPSAMPLE_UPSAMPLERS[kind])
    check(FPN_UPSAMPLE, fpn_upsample_shapes, fpn_upsample_forward, cfg, pyramid_for(image, backend, seed), backend,
          seed)


@pytest.mark.parametrize("extra", [dict(add_extra_convs="on_input"), dict(add_extra_convs=True, start_level=1),
                                   dict(add_extra_convs="on_lateral", relu_before_extra_convs=True),
                                   dict(add_extra_convs="on_output", relu_before_extra_convs=True, num_outs=6),
                                   dict(end_level=2, num_outs=3)],
                         ids=["on_input", "true_start1", "on_lateral_relu", "on_output_relu", "end2"])
def test_fpn_upsample_levels(extra):
    """RetinaNet-style extra convs (their unused upsamplers in the key set), start and end levels."""
    seed = fresh_seed()
    cfg = dict(dict(in_channels=[8, 16, 8, 24], out_channels=8, num_outs=5,
                    upsample_cfg=dict(UPSAMPLE_UPSAMPLERS["dysample"], groups=2)), **extra)
    xs = pyramid((128, 64), 4, seed, cfg["in_channels"])
    check(FPN_UPSAMPLE, fpn_upsample_shapes, fpn_upsample_forward, cfg, xs, "torch", seed)


def test_fpn_upsample_refuses_odd_sizes():
    """The official sum fails unless each level is twice the one above: a clear error here."""
    neck = FPN_UPSAMPLE(IN_CHANNELS, 8, 4)
    with pytest.raises(ValueError, match="level 3 upsampled to"):
        neck([x.float() for x in pyramid((13, 11), 4, 0)])


# ---- initialisation and arguments -------------------------------------------------------------------------

def test_official_initialisation():
    """FPN_LAU: xavier-uniform convs and deconvs, zero biases, then LDA-AQU's and CARAFE's own init.
    FPN_UPSAMPLE: xavier-uniform on every Conv2d (DySample's too: mmengine's init_cfg reaches them, the
    N(0, 0.001) of DySample's own init does not survive), deconvs at PyTorch's default."""
    def xavier(w):
        bound = math.sqrt(6 / ((w.shape[0] + w.shape[1]) * w[0, 0].numel()))
        return w.abs().max() <= bound and w.std() > bound / 3

    lau = FPN_LAU(IN_CHANNELS, 16, 5, upsample_cfg=LAU_UPSAMPLERS["lda_aqu"])
    assert all(xavier(c.conv.weight) and not c.conv.bias.any() for c in [*lau.lateral_convs, *lau.fpn_convs])
    for m in lau.upsample_modules:
        assert xavier(m.proj_q.weight) and not m.conv_offset[3].weight.any()
        assert torch.all(m.layer_norm.norm.weight == 1)
    carafe = FPN_LAU(IN_CHANNELS, 16, 5, upsample_cfg=LAU_UPSAMPLERS["carafe"]).upsample_modules[0]
    assert carafe.content_encoder.weight.std() < 0.002 and xavier(carafe.channel_compressor.weight)
    assert xavier(FPN_LAU(IN_CHANNELS, 16, 5, upsample_cfg=LAU_UPSAMPLERS["deconv"]).upsample_modules[0].weight)
    ups = FPN_UPSAMPLE(IN_CHANNELS, 16, 5, upsample_cfg=UPSAMPLE_UPSAMPLERS["dysample"])
    for m in ups.upsample_modules:
        assert xavier(m.offset.weight) and xavier(m.scope.weight) and not m.scope.bias.any()
    deconv = FPN_UPSAMPLE(IN_CHANNELS, 16, 5, upsample_cfg=dict(type="deconv")).upsample_modules[0]
    assert deconv.bias.any()  # PyTorch's default, untouched by the Conv2d-only init_cfg


BAD = [
    (FPN_LAU, dict(norm_cfg=dict(type="BN")), "norm_cfg"),
    (FPN_LAU, dict(act_cfg=dict(type="ReLU")), "act_cfg"),
    (FPN_LAU, dict(order=("norm", "conv", "act")), "order"),
    (FPN_LAU, dict(upsample_cfg=dict(type="fade")), "upsample_cfg"),
    (FPN_LAU, dict(upsample_cfg=dict(type="deconv")), "upsample_kernel"),
    (FPN_LAU, dict(upsample_cfg=dict(type="deconv", upsample_kernel=5)), "upsample_kernel"),
    (FPN_LAU, dict(upsample_cfg=dict(type="lda_aqu", k_x=3)), "upsample_cfg"),
    (FPN_LAU, dict(upsample_cfg=dict(type="bilinear", align_corners=True)), "upsample_cfg"),
    (FPN_LAU, dict(end_level=1), "num_outs"),
    (FPN_LAU, dict(start_level=4), "start_level"),
    (FPN_LAU, dict(end_level=-2), "end_level"),
    (FPN_LAU, dict(num_outs=3), "num_outs"),
    (FPN_LAU, dict(backend="cuda"), "backend"),
    (FPN_UPSAMPLE, dict(conv_cfg=dict(type="DCN")), "conv_cfg"),
    (FPN_UPSAMPLE, dict(upsample_cfg=dict(type="dysample", guided=True)), "guided"),
    (FPN_UPSAMPLE, dict(upsample_cfg=dict(type="sapa", guided=False)), "upsample_cfg"),
    (FPN_UPSAMPLE, dict(add_extra_convs="on_top"), "add_extra_convs"),
    (FPN_UPSAMPLE, dict(init_cfg=dict(type="Kaiming")), "init_cfg"),
    (FPN_UPSAMPLE, dict(in_channels=[]), "in_channels"),
]


@pytest.mark.parametrize("cls,kw,arg", BAD, ids=[f"{c.__name__}:{a}:{kw}" for c, kw, a in BAD])
def test_bad_arguments_raise(cls, kw, arg):
    with pytest.raises(ValueError, match=arg):
        cls(**dict(dict(in_channels=IN_CHANNELS, out_channels=16, num_outs=5), **kw))


def test_dysample_scope_bias_and_scale_factor():
    m = DySample(16, scale_factor=3, dyscope=True, scope_bias=True)
    assert m.scale == 3 and m.scope.bias is not None and not m.scope.bias.any()
    assert "scope.bias" not in DySample(16, dyscope=True).state_dict()  # the standalone DySample's keys
    with pytest.raises(ValueError, match="scale_factor"):
        DySample(16, 3, scale_factor=4)
    with pytest.raises(ValueError, match="scope_bias"):
        DySample(16, scope_bias=True)


# ---- the registry -----------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_configs_build_through_mmengine():
    """The two config dicts unchanged, through the root registry, a child (as mmdet's) and custom_imports."""
    pytest.importorskip("mmengine", reason="the mm extra (pip install lda-aqu[mm])")
    from mmengine.registry import MODELS, Registry
    from mmengine.utils import import_modules_from_strings
    import_modules_from_strings(["lda_aqu"])
    child = Registry("model", parent=MODELS, scope="lda_aqu_test_necks")
    for registry in (MODELS, child):
        for cls, cfg, _, key_set in (RELEASED["lda_aqu"], RELEASED["dysample"]):
            neck = registry.build(dict(cfg))
            assert type(neck) is cls
            assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == key_set(**kwargs(cfg))
