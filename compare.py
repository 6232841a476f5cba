"""Does a learned upsampler help? Train one small segmentation model per upsampler and compare them on
held-out images: mIoU, boundary F-score (and object F1 where the task has instances), parameters and
time per step.

    python compare.py [--task outlines|nuclei] [--quick] [--seeds 0 1 2] [--steps N] [--upsamplers nearest lda_aqu]
    torchrun --nproc_per_node=2 compare.py ...   # DistributedDataParallel, each rank a shard of every batch

Tasks. "outlines" (the default): generated textured noise with rings, straight lines and triangle/quadrilateral
outlines 1-3 px wide, told apart by shape only (random colours), from --data-seed. "nuclei": the 512x512
fluorescence image of nuclei and its instance labels that ship in the stardist 0.9.2 wheel (2018 Data Science
Bowl), fetched once into --data-dir; trained on random crops of the top half with flips and 90-degree rotations,
validated on the whole bottom half; classes background, interior, boundary (the instances' inner 1 px rim),
objects the connected components of the predicted interior.

The model: a conv encoder (a full-resolution stem, then stride-2 stages down to 1/8), `upsampler.FPN` over all
four levels with the upsampler under test on every top-down step (the last lands on full resolution; the guided
ones, SAPA and FADE, guided by the encoder's lateral at the level they land on), and BN,
ReLU and a 1x1 classifier on its finest output. Cross-entropy with ENet class weights, AdamW, linear warm-up then
cosine decay. Every run uses the same data, optimiser, schedule, steps and, for a given seed, the same batches and
initial weights of everything but the upsamplers. Writes compare.csv (rows keyed by device), compare.png and
TABLE.md under --out.
"""
from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lda_aqu.upsampler as upsampler
from lda_aqu.upsampler import FPN, select_backend
from lda_aqu.upsampler.fpn import UPSAMPLERS

# each paper's defaults; widths tied to 256-channel necks scaled to ours (CARAFE compresses C/4 as mmdet's 256 -> 64)
UPSAMPLER_CFG = {"carafe": lambda c: dict(up_kernel=5, encoder_kernel=3, compressed_channels=c // 4),
                 "dysample": lambda c: dict(style="lp", groups=4),
                 "lda_aqu": lambda c: dict(reduction_factor=4, k_u=3, n_groups=2),
                 # SAPA's 32-wide embedding and FADE's 64-wide compressors at 256 channels: C/4 here, as CARAFE's
                 # compressor and LDA-AQU's queries; SAPA's GroupNorms keep 8 channels a group; FADE's paper model
                 # gates (the detection configs' builder defaults to no gate)
                 "sapa": lambda c: dict(embedding_dim=c // 4, norm_groups=c // 8),
                 "fade": lambda c: dict(gating=True, embedding_dim=c // 4)}
METRIC_NAMES = {"miou": "val mIoU", "boundary_f": "boundary F", "object_f1": "object F1 (IoU 0.5)"}


def columns(task) -> tuple[str, ...]:
    return ("device", "threads", "ranks", "torch", "triton", "backend", "date", "steps", "batch", "size", "width",
            "set", "upsampler", "seed", "params", "upsampler_params", "ms_per_step", "ms_per_step_median",
            *task.metrics, *(f"iou_{c}" for c in task.classes), "loss_start", "loss_end", "offset_px")


CLASSES = ("background", "ring", "line", "polygon")  # the outlines task


# ---------------------------------------------------------------------------------------------- data

def _segment_distance(py, px, a, b):
    """Distance of the pixels (py, px) [H, W] to the segment a-b (y, x)."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    t = (((py - a[0]) * dy + (px - a[1]) * dx) / max(dy * dy + dx * dx, 1e-6)).clamp(0, 1)
    return torch.hypot(py - a[0] - t * dy, px - a[1] - t * dx)


def _noise(size: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth noise [3, size, size]: a random cells x cells grid, bicubically upsampled."""
    grid = torch.randn(1, 3, cells, cells, generator=gen, device="cpu").to(torch.get_default_device())
    return F.interpolate(grid, (size, size), mode="bicubic", align_corners=False)[0]


def render(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image [3, size, size] in about [-1, 1] and its labels [size, size] (indices into CLASSES)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=gen, device="cpu").item()  # noqa: E731
    img = 0.5 * _noise(size, 4, gen) + 0.25 * _noise(size, size // 4, gen) + 0.1 * torch.randn(
        3, size, size, generator=gen, device="cpu").to(torch.get_default_device())
    label = torch.zeros(size, size, dtype=torch.long)
    py, px = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for _ in range(int(torch.randint(2, 6, (), generator=gen, device="cpu"))):
        cls = int(torch.randint(1, len(CLASSES), (), generator=gen, device="cpu"))
        width = u(1.0, 3.0)
        if cls == 1:  # ring
            r = u(3, size / 4)
            cy, cx = u(0, size), u(0, size)
            d = (torch.hypot(py - cy, px - cx) - r).abs()
        elif cls == 2:  # straight line, at least a third of the image long
            a = (u(0, size), u(0, size))
            ang, length = u(0, math.pi), u(size / 3, size)
            d = _segment_distance(py, px, a, (a[0] + length * math.sin(ang), a[1] + length * math.cos(ang)))
        else:  # triangle or quadrilateral outline, jittered vertices
            n, r, rot = int(torch.randint(3, 5, (), generator=gen, device="cpu")), u(5, size / 4), u(0, 2 * math.pi)
            cy, cx = u(0, size), u(0, size)
            angles = [rot + 2 * math.pi * (i + u(-0.15, 0.15)) / n for i in range(n)]
            pts = [(cy + r * math.sin(t), cx + r * math.cos(t)) for t in angles]
            d = torch.stack([_segment_distance(py, px, pts[i], pts[(i + 1) % n]) for i in range(n)]).amin(0)
        colour = torch.rand(3, 1, 1, generator=gen, device="cpu").to(torch.get_default_device()) * 2 - 1
        colour = colour + 0.5 * colour.sign()  # away from the background's mean
        alpha = (width / 2 + 0.5 - d).clamp(0, 1)  # anti-aliased stroke
        img = img * (1 - alpha) + colour * alpha
        label[d <= width / 2] = cls
    return img, label


def make_dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    imgs, labels = zip(*(render(size, gen) for _ in range(n)))
    return torch.stack(imgs), torch.stack(labels)


class Outlines:
    """Generated images: a fixed training set drawn in random order, epoch by epoch."""
    name, classes, in_channels, metrics = "outlines", CLASSES, 3, ("miou", "boundary_f")
    colours = ("#202020", "tab:orange", "tab:cyan", "tab:pink")
    defaults = dict(steps=600, batch=8, size=48, width=24, train=1024, val=128)
    quick = dict(steps=10, batch=2, size=32, width=8, train=16, val=8)
    instances = None

    def __init__(self, args):
        self.train = make_dataset(args.train, args.size, args.data_seed)
        self.val = make_dataset(args.val, args.size, args.data_seed + 1)
        self.view = (args.show, slice(None), slice(None))
        self.summary = (f"{args.train} train / {args.val} val images {args.size}x{args.size}, "
                        f"{100 * (self.train[1] > 0).float().mean():.1f}% thin-structure pixels")
        self.legend = "classes: orange ring, cyan line, pink polygon"

    def batches(self, seed: int, batch: int):
        xtr, ytr = self.train
        order = torch.Generator().manual_seed(seed)
        perm, pos = torch.randperm(len(xtr), generator=order, device="cpu").to(xtr.device), 0
        while True:
            if pos + batch > len(perm):
                perm, pos = torch.randperm(len(xtr), generator=order, device="cpu").to(xtr.device), 0
            idx = perm[pos:pos + batch]
            pos += batch
            yield xtr[idx], ytr[idx]


# the two files of the stardist 0.9.2 wheel (BSD-3; the same in each of its platform wheels) and their sha256
STARDIST = "stardist==0.9.2"
STARDIST_FILES = {"img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
                  "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"}
# one wheel whatever the machine, and never an sdist build
PIP_DOWNLOAD = ("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--platform",
                "manylinux_2_28_x86_64", STARDIST)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fetch_nuclei(data_dir: str) -> dict[str, str]:
    """Paths of img2d.tif and mask2d.tif in data_dir, extracted there from the stardist wheel (a wheel already in
    data_dir is used, else pip downloads one); checksums verified."""
    paths = {f: os.path.join(data_dir, f) for f in STARDIST_FILES}
    if not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(data_dir, exist_ok=True)
        wheels = [f for f in os.listdir(data_dir) if f.startswith("stardist-0.9.2-") and f.endswith(".whl")]
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            if wheels:
                wheel = os.path.join(data_dir, wheels[0])
            else:
                r = subprocess.run([sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", tmp], capture_output=True,
                                   text=True)
                found = [f for f in os.listdir(tmp) if f.endswith(".whl")]
                if r.returncode or not found:
                    raise RuntimeError(
                        f"could not download the {STARDIST} wheel that holds the nuclei data (is the package index "
                        f"reachable?). Run\n    {sys.executable} -m pip {' '.join(PIP_DOWNLOAD)} -d {data_dir}\n"
                        f"where it is, or put that wheel in {data_dir}, and rerun. pip said:\n{r.stderr[-1500:]}")
                wheel = os.path.join(tmp, found[0])
            with zipfile.ZipFile(wheel) as z:
                for f, p in paths.items():
                    with z.open(f"stardist/data/images/{f}") as src, open(p + ".part", "wb") as dst:
                        dst.write(src.read())
                    os.replace(p + ".part", p)
    for f, p in paths.items():
        if _sha256(p) != STARDIST_FILES[f]:
            raise RuntimeError(f"{p} has sha256 {_sha256(p)}, not the {STARDIST} wheel's {STARDIST_FILES[f]}: "
                               f"delete it and rerun to fetch it again")
    return paths


def instance_boundary(inst: torch.Tensor) -> torch.Tensor:
    """Pixels of an instance [H, W] with another label (background or instance) in their 3x3 neighbourhood: the
    inner rim, 1 px wide (2 px where two nuclei touch). The image edge is no boundary."""
    x = F.pad(inst.double()[None, None], (1, 1, 1, 1), mode="replicate")
    return ((F.max_pool2d(x, 3, 1) != -F.max_pool2d(-x, 3, 1))[0, 0]) & (inst > 0)


def semantic(inst: torch.Tensor) -> torch.Tensor:
    """Classes [H, W] (0 background, 1 interior, 2 boundary) from instance labels [H, W]."""
    return torch.where(instance_boundary(inst), 2, (inst > 0).long())


class Nuclei:
    """stardist's 2-D nuclei image: random crops of the top half (flips, 90-degree rotations); the bottom half whole."""
    name, classes, in_channels = "nuclei", ("background", "interior", "boundary"), 1
    metrics = ("miou", "boundary_f", "object_f1")
    colours = ("#202020", "#3b75af", "#f0f0f0")
    defaults = dict(steps=250, batch=4, size=96, width=24)
    quick = dict(steps=10, batch=2, size=32, width=8)

    def __init__(self, args):
        import tifffile  # the optional "bench" extra

        paths = fetch_nuclei(args.data_dir)
        img = torch.from_numpy(tifffile.imread(paths["img2d.tif"]).astype("float32"))
        inst = torch.from_numpy(tifffile.imread(paths["mask2d.tif"]).astype("int64"))
        half = img.shape[0] // 2
        lo, hi = torch.quantile(img[:half], torch.tensor([0.01, 0.998]))  # from the training half only
        img = ((img - lo) / (hi - lo) * 2 - 1)[None]
        label = semantic(inst)
        if args.size > half or args.size % 8:
            raise SystemExit(f"--size (the crop) must be a multiple of 8 up to {half} for this task, got {args.size}")
        self.image, self.label = img[:, :half], label[:half]
        self.val = img[None, :, half:], label[None, half:]
        self.instances = inst[None, half:]
        self.view = (0, slice(64, 192), slice(160, 288))
        n = lambda t: len(t.unique()) - 1  # noqa: E731
        self.summary = (f"{args.size}x{args.size} crops of the top half ({n(inst[:half])} nuclei), the bottom half "
                        f"{tuple(self.val[1].shape[1:])} whole ({n(self.instances)} nuclei) for validation; "
                        f"{100 * (label == 2).float().mean():.1f}% boundary pixels")
        self.legend = "blue interior, white boundary"
        self.size = args.size

    @staticmethod
    def objects(pred: torch.Tensor) -> torch.Tensor:
        return nuclei_objects(pred)

    @property
    def train(self):
        return self.image[None], self.label[None]

    def batches(self, seed: int, batch: int):
        gen = torch.Generator().manual_seed(seed)
        s, (h, w) = self.size, self.label.shape
        while True:
            ys = torch.randint(0, h - s + 1, (batch,), generator=gen, device="cpu")
            xs = torch.randint(0, w - s + 1, (batch,), generator=gen, device="cpu")
            rot = torch.randint(0, 4, (batch,), generator=gen, device="cpu")
            flip = torch.randint(0, 2, (batch,), generator=gen, device="cpu")
            crops = []
            for y0, x0, k, f in zip(ys.tolist(), xs.tolist(), rot.tolist(), flip.tolist()):
                x = self.image[:, y0:y0 + s, x0:x0 + s]
                y = self.label[y0:y0 + s, x0:x0 + s]
                x, y = x.rot90(k, (1, 2)), y.rot90(k, (0, 1))
                crops.append((x.flip(2), y.flip(1)) if f else (x, y))
            x, y = zip(*crops)
            yield torch.stack(x), torch.stack(y)


TASKS = {"outlines": Outlines, "nuclei": Nuclei}


# --------------------------------------------------------------------------------------------- model

class _AllReduce(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's copy is the sum of theirs."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduce.forward(ctx, grad)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics cover the whole batch across ranks when a process group is up, so a
    DDP run normalises as one process would (torch's SyncBatchNorm refuses CPU tensors)."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = _AllReduce.apply(x.sum((0, 2, 3))) / count
        var = _AllReduce.apply(((x - mean[:, None, None]) ** 2).sum((0, 2, 3))) / count  # two passes: no cancellation
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """Encoder (strides 1, 2, 4, 8) -> FPN with `upsampler` -> BN, ReLU, 1x1 classifier on its full-resolution map."""

    def __init__(self, upsampler_name: str, width: int = 24, num_classes: int = 4, in_channels: int = 3,
                 backend: str = "auto", **upsampler_cfg):
        super().__init__()
        widths = [width // 2, width // 2, width, width * 3 // 2]
        stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), BatchNorm2d(widths[0]),
                             nn.ReLU(True))
        self.encoder = nn.ModuleList([stem] + [_block(c_in, c_out, 2) for c_in, c_out in zip(widths, widths[1:])])
        self.head = nn.Sequential(BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))
        # built last, so the RNG gives every other layer the same initial weights whatever the upsampler
        cfg = UPSAMPLER_CFG[upsampler_name](width) if upsampler_name in UPSAMPLER_CFG else {}
        self.neck = FPN(widths, width, upsampler_name, upsampler_cfg=dict(cfg, **upsampler_cfg, backend=backend))
        # only the finest output feeds the head: the coarser levels' output convs would be dead weight
        for i in range(1, len(widths)):
            self.neck.fpn_convs[i] = nn.Identity()

    def forward(self, x):
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        return self.head(self.neck(feats)[0])


# ------------------------------------------------------------------------------------------- metrics

def confusion(pred: torch.Tensor, label: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(label.flatten() * k + pred.flatten(), minlength=k * k).reshape(k, k)


def miou(conf: torch.Tensor) -> tuple[float, list[float]]:
    conf = conf.double()
    iou = conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag()).clamp_min(1)
    return iou.mean().item(), iou.tolist()


def boundaries(label: torch.Tensor, k: int) -> torch.Tensor:
    """Per-class inner boundaries [N, k, H, W] (bool): pixels of the class with a 4-neighbour of another."""
    onehot = F.one_hot(label, k).permute(0, 3, 1, 2).float()
    erode = lambda kh, kw: -F.max_pool2d(-onehot, (kh, kw), 1, (kh // 2, kw // 2))  # noqa: E731
    return onehot > torch.minimum(erode(3, 1), erode(1, 3))


def boundary_maps(pred: torch.Tensor, label: torch.Tensor, k: int, tol: int) -> tuple[torch.Tensor, ...]:
    """Per-class boundary pixels [N, k, H, W] (float 0/1): predicted, predicted within `tol` px of a true one (a
    max-pool dilation of the other map), true, true within `tol` px of a predicted one."""
    bp, bt = boundaries(pred, k).float(), boundaries(label, k).float()
    grow = lambda b: F.max_pool2d(b, 2 * tol + 1, 1, tol)  # noqa: E731
    return bp, bp * grow(bt), bt, bt * grow(bp)


def boundary_counts(pred: torch.Tensor, label: torch.Tensor, k: int, tol: int) -> torch.Tensor:
    """[k, 4] counts (matched predicted, predicted, matched true, true) of boundary pixels per class."""
    bp, mp, bt, mt = boundary_maps(pred, label, k, tol)
    return torch.stack([m.sum((0, 2, 3)) for m in (mp, bp, mt, bt)], 1)


def boundary_f(counts: torch.Tensor) -> float:
    """Mean over classes of the boundary F-score from boundary_counts summed over the set."""
    p = counts[:, 0] / counts[:, 1].clamp_min(1)
    r = counts[:, 2] / counts[:, 3].clamp_min(1)
    return (2 * p * r / (p + r).clamp_min(1e-12)).mean().item()


def _compact(lab: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Labels renumbered 0..n-1 with 0 kept for 0, and n."""
    vals, inv = torch.unique(lab, return_inverse=True)
    shift = int(vals[0] != 0)
    return inv + shift, len(vals) + shift


def components(mask: torch.Tensor) -> torch.Tensor:
    """Labels [H, W] (0 off the mask, then 1..n) of the 4-connected components of a bool mask [H, W]: every pixel
    takes the largest index among its neighbours on the mask until nothing changes."""
    h, w = mask.shape
    on = mask.double()[None, None]
    lab = torch.arange(1, h * w + 1, dtype=torch.float64).reshape(1, 1, h, w) * on
    while True:
        grown = torch.maximum(F.max_pool2d(lab, (3, 1), 1, (1, 0)), F.max_pool2d(lab, (1, 3), 1, (0, 1))) * on
        if torch.equal(grown, lab):
            return _compact(lab[0, 0].long())[0]
        lab = grown


def object_counts(objects: torch.Tensor, instances: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """(matched, predicted, true) object counts [3] of predicted objects against true instances (label maps [H, W],
    0 background), a pair matching at IoU above `iou` (above 0.5 no object can match twice)."""
    (p, n_p), (t, n_t) = _compact(objects), _compact(instances)
    inter = torch.bincount((p * n_t + t).flatten(), minlength=n_p * n_t).reshape(n_p, n_t).double()
    union = inter.sum(1, keepdim=True) + inter.sum(0, keepdim=True) - inter
    return torch.tensor([int((inter / union)[1:, 1:].gt(iou).sum()), n_p - 1, n_t - 1])


def f1(counts: torch.Tensor) -> float:
    """F1 from object_counts summed over the set."""
    tp, n_p, n_t = counts.tolist()
    return 1.0 if n_p + n_t == 0 else 2 * tp / (n_p + n_t)


def nuclei_objects(pred: torch.Tensor) -> torch.Tensor:
    """Objects [H, W] from a 3-class prediction [H, W]: components of the interior, each grown by its 1 px rim into
    the neighbouring predicted boundary."""
    lab = components(pred == 1).double()[None, None]
    grown = F.max_pool2d(lab, 3, 1, 1)
    return torch.where((lab == 0) & (pred == 2), grown, lab)[0, 0].long()


# -------------------------------------------------------------------------------------------- train

def distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): a process group from torchrun's environment (gloo on CPU, nccl on CUDA), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":  # one GPU a rank: NCCL's collectives run on the current device
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def upsampler_modules(model: Segmenter) -> list[nn.Module]:
    return list(getattr(model.neck, "upsample_modules", []))


def offset_probe(model: Segmenter):
    """Forward hooks that collect the mean |learned offset| (beyond the base grid) in input pixels, per
    upsampler, finest first."""
    seen, handles = {}, []

    def lda_aqu(i, m, args, kwargs, out):
        grid = m.base_offset.repeat(1, m.n_groups, 1, 1)  # in output pixels: 1/scale_factor of an input one
        off = m.sampling_offsets(args[0], kwargs.get("size"))
        seen.setdefault(i, []).append(((off - grid).abs().mean() / m.scale_factor).item())

    def dysample(i, m, inp, out):
        seen.setdefault(i, []).append((out * 0.25).abs().mean().item())
    for i, m in enumerate(upsampler_modules(model)):
        if isinstance(m, upsampler.LDAAQU):
            handles.append(m.register_forward_hook(lambda *a, i=i: lda_aqu(i, *a), with_kwargs=True))
        elif isinstance(m, upsampler.DySample):
            handles.append(m.offset.register_forward_hook(lambda *a, i=i: dysample(i, *a)))
    return seen, handles


def train(name: str, seed: int, task, args, device, dtype=torch.float32) -> tuple[Segmenter, list, list]:
    """The model trained with upsampler `name` from `seed`, its losses and step times. Under a process group every
    rank draws the same batches and trains on its shard of each (DDP averages the gradients); the loss is
    rescaled so that the step is the one process's on the whole batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of ranks, {world}")
    torch.manual_seed(seed)
    model = Segmenter(name, args.width, len(task.classes), task.in_channels, backend=args.backend,
                      **args.overrides.get(name, {})).to(device, dtype)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    # thin classes are a few percent of the pixels: ENet's class weights 1 / ln(1.02 + frequency), from the training set
    ytr = task.train[1]
    freq = torch.bincount(ytr.flatten(), minlength=len(task.classes)).double() / ytr.numel()
    class_weight = (1 / torch.log(1.02 + freq)).to(device, dtype)
    shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    batches = task.batches(seed, args.batch)
    losses, times = [], []
    model.train()
    for step in range(args.steps):
        x, y = next(batches)
        x, y = x[shard].to(device, dtype), y[shard].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y, weight=class_weight)
        if world > 1:  # the shard's weighted mean, weighed by its share of the batch's class weights
            mine = class_weight[y].sum()
            total = mine.clone()
            dist.all_reduce(total)
            loss = loss * (mine * world / total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            if rank == 0:
                print(f"  {name} seed {seed}: loss {losses[-1]} at step {step}, stopping this run")
            break
    return model, losses, times


def evaluate(model: Segmenter, task, args, device) -> dict:
    """Validation metrics (task.metrics, per-class IoU), the learned offsets per level and the predictions."""
    k, dtype = len(task.classes), next(model.parameters()).dtype
    conf, bcounts, ocounts = torch.zeros(k, k, dtype=torch.long), torch.zeros(k, 4), torch.zeros(3, dtype=torch.long)
    xva, yva = task.val
    model.eval()
    seen, handles = offset_probe(model)
    preds = []
    with torch.no_grad():
        for i in range(0, len(xva), 32):
            pred = model(xva[i:i + 32].to(device, dtype)).argmax(1).cpu()
            conf += confusion(pred, yva[i:i + 32], k)
            bcounts += boundary_counts(pred, yva[i:i + 32], k, args.tol)
            if task.instances is not None:
                for p, inst in zip(pred, task.instances[i:i + 32]):
                    ocounts += object_counts(task.objects(p), inst)
            preds.append(pred)
    for h in handles:
        h.remove()
    m, ious = miou(conf)
    return dict(miou=m, boundary_f=boundary_f(bcounts), **({"object_f1": f1(ocounts)} if task.instances is not None
                                                           else {}),
                **{f"iou_{c}": v for c, v in zip(task.classes, ious)},
                offset_px="/".join(f"{statistics.fmean(seen[i]):.2f}" for i in sorted(seen)), pred=torch.cat(preds))


def train_one(name: str, seed: int, task, args, device) -> dict | None:
    """One run's row (None on the ranks other than 0, which only help train)."""
    model, losses, times = train(name, seed, task, args, device)
    if dist.is_initialized() and dist.get_rank() > 0:
        return None
    tail = max(1, len(losses) // 5)
    timed = times[min(len(times) - 1, max(2, len(times) // 10)):]  # after warm-up: allocator, first-call set-up
    return dict(upsampler=name, seed=seed, params=sum(p.numel() for p in model.parameters()),
                upsampler_params=sum(p.numel() for m in upsampler_modules(model) for p in m.parameters()),
                ms_per_step=1e3 * statistics.fmean(timed), ms_per_step_median=1e3 * statistics.median(timed),
                **evaluate(model, task, args, device), loss_start=statistics.fmean(losses[:tail]),
                loss_end=statistics.fmean(losses[-tail:]), losses=losses)


# ------------------------------------------------------------------------------------------ outputs

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student's t, 97.5%, df 1..10


def t975(df: int) -> float:
    z = 1.959964  # beyond df 10, the Cornish-Fisher expansion (within 0.003)
    return T975[df - 1] if df <= len(T975) else z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (
        96 * df ** 2)


def paired(results: list[dict], name: str, key: str, ref: str = "nearest"):
    """(mean, 95% t-interval half-width or None) of `key`'s difference between `name` and `ref` over the seeds both
    ran, or None when they share none."""
    a, b = ({r["seed"]: r[key] for r in results if r["upsampler"] == n} for n in (name, ref))
    d = [a[s] - b[s] for s in a if s in b]
    if not d:
        return None
    return statistics.fmean(d), (t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None)


def where(meta: dict) -> str:
    n, ranks = meta["threads"], meta["ranks"]
    return meta["device"] + (f", {n} thread{'s' * (n > 1)}" if meta["device"].startswith("CPU") else "") + (
        f" x {ranks} ranks" if ranks > 1 else "")


def _fmt(vals, digits=3):
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(results: list[dict], task, meta: dict, args) -> str:
    names = list(dict.fromkeys(r["upsampler"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    label = lambda m: METRIC_NAMES[m] + (f" (±{args.tol} px)" if m == "boundary_f" else "")  # noqa: E731
    lines = [f"{where(meta)}, torch {meta['torch']}, triton {meta['triton']}, backend \"{args.backend}\" = "
             f"{meta['backend']}; task {task.name}, {args.steps} steps, batch {args.batch}, {args.size}x{args.size} "
             f"px, width {args.width}, seeds {' '.join(map(str, seeds))}" + "".join(f", {item}" for item in args.set)
             + (" (mean ± std over seeds)." if len(seeds) > 1 else "."),
             "",
             "| upsampler | " + " | ".join(map(label, task.metrics)) + f" | IoU {' / '.join(task.classes[1:])} "
             "| params (upsamplers) | ms / step |",
             "| --- " * (len(task.metrics) + 4) + "|"]
    for n in names:
        rs = [r for r in results if r["upsampler"] == n]
        ious = " / ".join(f"{statistics.fmean(r[f'iou_{c}'] for r in rs):.2f}" for c in task.classes[1:])
        lines.append(f"| {n} | " + " | ".join(_fmt([r[m] for r in rs]) for m in task.metrics) + f" | {ious} "
                     f"| {rs[0]['params']:,} ({rs[0]['upsampler_params']:,}) "
                     f"| {statistics.fmean(r['ms_per_step'] for r in rs):.0f} |")
    diffs = {n: [paired(results, n, m) for m in task.metrics] for n in names if n != "nearest"}
    if len(seeds) > 1 and all(d and d[1] is not None for ds in diffs.values() for d in ds):
        lines += ["", f"Paired difference against nearest (same seed: same batches and initial weights), mean over "
                      f"seeds [95% t-interval, {len(seeds) - 1} degrees of freedom]:", "",
                  "| upsampler | " + " | ".join(f"Δ {label(m)}" for m in task.metrics) + " |",
                  "| --- " * (len(task.metrics) + 1) + "|"]
        for n, ds in diffs.items():
            lines.append(f"| {n} | " + " | ".join(f"{d:+.3f} [{d - h:+.3f}, {d + h:+.3f}]" for d, h in ds) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str, results: list[dict], task, meta: dict):
    """Rows of other devices are kept; this device's are replaced."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["device"] != meta["device"]]
    cols = columns(task)
    for r in results:
        rows.append({**meta, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items() if k in cols}})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def figure(path: str, results: list[dict], task, meta: dict, args):
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    names = list(dict.fromkeys(r["upsampler"] for r in results))
    n_seeds = len({r["seed"] for r in results})
    colours = [f"C{i}" for i in range(len(names))]
    width = max(11.0, 2.2 * (len(names) + 2))
    fig = plt.figure(figsize=(width, 6.6), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[1.25, 1])
    top = [fig.add_subplot(g) for g in outer[0].subgridspec(1, len(task.metrics) + 1, wspace=0.1)]
    bottom = outer[1].subgridspec(1, len(names) + 2)
    for ax, key in zip(top, task.metrics):
        means = [statistics.fmean(r[key] for r in results if r["upsampler"] == n) for n in names]
        # the interval of each upsampler's paired difference against nearest, drawn around its mean
        half = [(paired(results, n, key) or (0, None))[1] if n != "nearest" else None for n in names]
        err = [h or 0 for h in half] if any(h is not None for h in half) else None
        ax.bar(names, means, yerr=err, capsize=4, color=colours)
        if "nearest" in names and err is not None:
            ax.axhline(means[names.index("nearest")], color="k", lw=0.8, ls="--")
        lo = min(m - (e if err else 0) for m, e in zip(means, err or means))
        hi = max(m + (e if err else 0) for m, e in zip(means, err or means))
        ax.set_ylim(max(0, lo - 0.1 * (hi - lo) - 0.05), min(1, hi + 0.1 * (hi - lo) + 0.02))
        ax.set_title(METRIC_NAMES[key] + (f" (±{args.tol} px)" if key == "boundary_f" else ""), fontsize=10)
        ax.tick_params(axis="x", rotation=30)
    for n, colour in zip(names, colours):
        loss = torch.tensor(next(r["losses"] for r in results if r["upsampler"] == n))
        k = max(1, len(loss) // 20)
        smooth = F.avg_pool1d(loss[None, None], k, 1).flatten() if len(loss) >= k else loss
        top[-1].plot(torch.arange(len(smooth)) + k - 1, smooth, label=n, color=colour)
    top[-1].set_title(f"training loss (seed {args.seeds[0]}, running mean)", fontsize=10)
    top[-1].set_xlabel("step")
    top[-1].legend(fontsize=8)
    i, sy, sx = task.view
    img, label = task.val[0][i], task.val[1][i]
    palette = torch.tensor([to_rgb(c) for c in task.colours])
    panels = [("val image", (img.permute(1, 2, 0) * 0.35 + 0.5).clamp(0, 1).squeeze(-1)), ("truth", palette[label])]
    for n in names:  # the first seed's prediction, its boundary errors over it
        pred = next(r["pred"] for r in results if r["upsampler"] == n)[i]
        bp, mp, bt, mt = (m.amax(1)[0] for m in boundary_maps(pred[None], label[None], len(task.classes), args.tol))
        rgb = palette[pred]
        rgb[bp > mp] = torch.tensor(to_rgb("red"))
        rgb[bt > mt] = torch.tensor(to_rgb("yellow"))
        panels.append((n, rgb))
    for j, (title, im) in enumerate(panels):
        ax = fig.add_subplot(bottom[j])
        ax.imshow(im[sy, sx].numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    bars = (f"bars: mean over {n_seeds} seeds, whiskers: 95% t-interval of the paired difference against nearest "
            "(dashed), drawn around the mean" if n_seeds > 1 else "one seed")
    fig.suptitle(textwrap.fill(
        f"{where(meta)}, torch {meta['torch']}, backend {meta['backend']}: task {task.name}, {args.steps} steps, "
        f"{args.size}x{args.size} px; {bars}. Predictions (seed {args.seeds[0]}): {task.legend}; red: predicted "
        f"boundary more than {args.tol} px from a true one, yellow: true boundary missed", int(width * 14)),
        fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results, task, meta, args) -> str:
    # the runs with their losses and predictions, for --replot (not committed)
    torch.save(dict(meta=meta, results=[dict(r, pred=r["pred"].to(torch.uint8)) for r in results]),
               os.path.join(args.out, "runs.pt"))
    write_csv(os.path.join(args.out, "compare.csv"), results, task, meta)
    text = table(results, task, meta, args)
    with open(os.path.join(args.out, "TABLE.md"), "w") as f:
        f.write(text)
    figure(os.path.join(args.out, "compare.png"), results, task, meta, args)
    return text


# --------------------------------------------------------------------------------------------- main

def default_data_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lda-aqu", "stardist-0.9.2")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="outlines", choices=TASKS)
    ap.add_argument("--quick", action="store_true", help="a tiny end-to-end run (CI): 2 upsamplers, a few steps")
    ap.add_argument("--upsamplers", nargs="+", choices=UPSAMPLERS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, help="default 600 (outlines), 250 (nuclei)")
    ap.add_argument("--batch", type=int, help="default 8 (outlines), 4 (nuclei)")
    ap.add_argument("--size", type=int, help="image side (outlines, default 48) or crop side (nuclei, 96), px")
    ap.add_argument("--width", type=int, help="FPN channels (default 24: encoder 12, 12, 24, 36)")
    ap.add_argument("--data-seed", type=int, default=1234, help="outlines: the generated data's seed")
    ap.add_argument("--train", type=int, help="outlines: training images (1024)")
    ap.add_argument("--val", type=int, help="outlines: validation images (128)")
    ap.add_argument("--data-dir", default=os.environ.get("LDA_AQU_DATA") or default_data_dir(),
                    help="nuclei: where the data are fetched once (default $LDA_AQU_DATA, else the user cache)")
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--tol", type=int, default=1, help="boundary match tolerance in pixels")
    ap.add_argument("--set", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="an upsampler argument off its paper's default, e.g. lda_aqu.range_factor=2 (for diagnosis: "
                         "the comparison itself leaves them all at their defaults)")
    ap.add_argument("--backend", default="auto", choices=upsampler.functional.BACKENDS, help="the upsamplers' backend")
    ap.add_argument("--threads", type=int, help="CPU threads per rank (torch.set_num_threads); default 2 split "
                                                "among the ranks, 1 with --quick")
    ap.add_argument("--show", type=int, default=0, help="outlines: the validation image in the figure")
    ap.add_argument("--time-limit", type=float, metavar="MIN",
                    help="start no seed that would end past this many minutes (judged by the seeds so far)")
    ap.add_argument("--resume", action="store_true", help="keep the runs in --out's runs.pt and train only the "
                                                          "missing (seed, upsampler) pairs")
    ap.add_argument("--replot", action="store_true", help="rewrite TABLE.md and compare.png from --out's runs.pt "
                                                          "(same arguments as the run that wrote it)")
    ap.add_argument("--out", help="default results/compare[-nuclei] (results/compare[-nuclei]-quick with --quick)")
    args = ap.parse_args(argv)
    task = TASKS[args.task]
    args.out = args.out or ("results/compare" + ("-nuclei" if args.task == "nuclei" else "")
                            + ("-quick" if args.quick else ""))
    for key, value in {**task.defaults, **(task.quick if args.quick else {})}.items():
        if getattr(args, key) is None:  # what is given wins over --quick
            setattr(args, key, value)
    args.overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, kw = key.partition(".")
        if name not in UPSAMPLERS or not kw.isidentifier() or not value:
            raise SystemExit(f"--set takes NAME.KEY=VALUE with NAME one of {UPSAMPLERS}, got {item!r}")
        args.overrides.setdefault(name, {})[kw] = ast.literal_eval(value)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    args.threads = args.threads or (1 if args.quick else max(1, 2 // ranks))  # tiny maps gain nothing from a second
    args.upsamplers = args.upsamplers or (("nearest", "lda_aqu") if args.quick else UPSAMPLERS)
    if args.width % 8:
        raise SystemExit(f"--width must be a multiple of 8 (LDA-AQU's groups, CARAFE's compressor), got {args.width}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    rank, world = distributed(device)
    import triton
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
                threads=args.threads, ranks=world, torch=torch.__version__, triton=triton.__version__,
                backend=select_backend(args.backend, torch.zeros(1, device=device)), date=time.strftime("%Y-%m-%d"),
                steps=args.steps, batch=args.batch, size=args.size, width=args.width, set=" ".join(args.set))
    say = print if rank == 0 else lambda *a, **k: None
    t0 = time.perf_counter()
    task = TASKS[args.task](args)
    say(f"{meta['device']} ({platform.processor() or platform.machine()}), torch {meta['torch']}, triton "
        f"{meta['triton']}, backend {args.backend} = {meta['backend']}, {world} rank{'s' * (world > 1)}; task "
        f"{task.name}: {task.summary} ({time.perf_counter() - t0:.1f} s)")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    results = []
    if args.replot or args.resume and os.path.exists(os.path.join(args.out, "runs.pt")):
        saved = torch.load(os.path.join(args.out, "runs.pt"), weights_only=False)  # our own file
        results = [dict(r, pred=r["pred"].long()) for r in saved["results"]]
        same = ("device", "threads", "ranks", "backend", "steps", "batch", "size", "width", "set")
        if args.replot:
            meta, args.seeds, args.upsamplers = saved["meta"], list(dict.fromkeys(r["seed"] for r in results)), []
            for key in ("steps", "batch", "size", "width"):
                setattr(args, key, meta[key])
        elif any(saved["meta"][k] != meta[k] for k in same):
            raise SystemExit(f"--resume: {args.out}/runs.pt was written with other settings: "
                             + ", ".join(f"{k} {saved['meta'][k]} (now {meta[k]})" for k in same
                                         if saved["meta"][k] != meta[k]))
    have, trained = {(r["seed"], r["upsampler"]) for r in results}, 0
    for seed in args.seeds:
        todo = [n for n in args.upsamplers if (seed, n) not in have]
        if not todo:
            continue
        spent = time.perf_counter() - t0
        stop = torch.tensor(bool(args.time_limit and trained and spent * (trained + 1) / trained
                                 > 60 * args.time_limit), device=device)
        if dist.is_initialized():  # rank 0 decides for all
            dist.broadcast(stop, 0)
        if stop:
            say(f"stopping after {trained} seeds: another would end past --time-limit {args.time_limit:g} min")
            break
        trained += 1
        for name in todo:
            t = time.perf_counter()
            r = train_one(name, seed, task, args, device)
            if r is None:
                continue
            results.append(r)
            say(f"  {name:9s} seed {seed}: " + ", ".join(f"{METRIC_NAMES[m].split(' (')[0]} {r[m]:.3f}"
                                                        for m in task.metrics)
                + f", loss {r['loss_start']:.3f} -> {r['loss_end']:.3f}, {r['ms_per_step']:.0f} ms/step"
                + (f", offsets {r['offset_px']} px" if r["offset_px"] else "") + f" ({time.perf_counter() - t:.0f} s)",
                flush=True)
            report(results, task, meta, args)  # after every run: an interrupted run keeps what it did
    if rank == 0:
        print("\n" + (report if args.replot else table)(results, task, meta, args))
        print(f"wrote {args.out}/compare.csv, TABLE.md, compare.png in {time.perf_counter() - t0:.0f} s "
              f"(timings on a shared machine are noisy)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
