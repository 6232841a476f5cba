"""Does a learned upsampler help? Train one small segmentation model per upsampler on a generated
dataset of thin outlines and compare validation mIoU, boundary F-score, parameters and time per step.

    python compare.py [--quick] [--seeds 0 1 2] [--steps 600] [--upsamplers nearest lda_aqu] [--out results/compare]

The data: textured noise with rings, straight lines and triangle/quadrilateral outlines 1-3 px wide,
told apart by shape only (random colours), generated from --data-seed. The model: a conv encoder
(a full-resolution stem, then stride-2 stages down to 1/8), `upsampler.FPN` over all four levels
with the upsampler under test on every top-down step (the last lands on full resolution), and BN,
ReLU and a 1x1 classifier on its finest output. Cross-entropy with ENet class weights, AdamW, linear
warm-up then cosine decay. Every run uses the same data, optimiser, schedule, steps and,
for a given seed, the same batches and initial weights of everything but the upsamplers. Writes
compare.csv (rows keyed by device), compare.png and TABLE.md under --out.
"""
from __future__ import annotations

import argparse
import ast
import csv
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import upsampler
from upsampler import FPN, select_backend
from upsampler.fpn import UPSAMPLERS

CLASSES = ("background", "ring", "line", "polygon")
# each paper's defaults; widths tied to 256-channel necks scaled to ours (CARAFE compresses C/4 as mmdet's 256 -> 64)
UPSAMPLER_CFG = {"carafe": lambda c: dict(up_kernel=5, encoder_kernel=3, compressed_channels=c // 4),
                 "dysample": lambda c: dict(style="lp", groups=4),
                 "lda_aqu": lambda c: dict(reduction_factor=4, k_u=3, n_groups=2)}
COLUMNS = ("device", "threads", "torch", "triton", "backend", "date", "steps", "batch", "size", "width", "set",
           "upsampler", "seed", "params", "upsampler_params", "ms_per_step", "ms_per_step_median", "miou", "boundary_f",
           *(f"iou_{c}" for c in CLASSES), "loss_start", "loss_end", "offset_px")


# ---------------------------------------------------------------------------------------------- data

def _segment_distance(py, px, a, b):
    """Distance of the pixels (py, px) [H, W] to the segment a-b (y, x)."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    t = (((py - a[0]) * dy + (px - a[1]) * dx) / max(dy * dy + dx * dx, 1e-6)).clamp(0, 1)
    return torch.hypot(py - a[0] - t * dy, px - a[1] - t * dx)


def _noise(size: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth noise [3, size, size]: a random cells x cells grid, bicubically upsampled."""
    return F.interpolate(torch.randn(1, 3, cells, cells, generator=gen), (size, size), mode="bicubic",
                         align_corners=False)[0]


def render(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image [3, size, size] in about [-1, 1] and its labels [size, size] (indices into CLASSES)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=gen).item()  # noqa: E731
    img = 0.5 * _noise(size, 4, gen) + 0.25 * _noise(size, size // 4, gen) + 0.1 * torch.randn(3, size, size,
                                                                                                generator=gen)
    label = torch.zeros(size, size, dtype=torch.long)
    py, px = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for _ in range(int(torch.randint(2, 6, (), generator=gen))):
        cls = int(torch.randint(1, len(CLASSES), (), generator=gen))
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
            n, r, rot = int(torch.randint(3, 5, (), generator=gen)), u(5, size / 4), u(0, 2 * math.pi)
            cy, cx = u(0, size), u(0, size)
            angles = [rot + 2 * math.pi * (i + u(-0.15, 0.15)) / n for i in range(n)]
            pts = [(cy + r * math.sin(t), cx + r * math.cos(t)) for t in angles]
            d = torch.stack([_segment_distance(py, px, pts[i], pts[(i + 1) % n]) for i in range(n)]).amin(0)
        colour = torch.rand(3, 1, 1, generator=gen) * 2 - 1
        colour = colour + 0.5 * colour.sign()  # away from the background's mean
        alpha = (width / 2 + 0.5 - d).clamp(0, 1)  # anti-aliased stroke
        img = img * (1 - alpha) + colour * alpha
        label[d <= width / 2] = cls
    return img, label


def make_dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    imgs, labels = zip(*(render(size, gen) for _ in range(n)))
    return torch.stack(imgs), torch.stack(labels)


# --------------------------------------------------------------------------------------------- model

def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """Encoder (strides 1, 2, 4, 8) -> FPN with `upsampler` -> BN, ReLU, 1x1 classifier on its full-resolution map."""

    def __init__(self, upsampler_name: str, width: int = 24, num_classes: int = len(CLASSES), backend: str = "auto",
                 **upsampler_cfg):
        super().__init__()
        widths = [width // 2, width // 2, width, width * 3 // 2]
        stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True))
        self.encoder = nn.ModuleList([stem] + [_block(c_in, c_out, 2) for c_in, c_out in zip(widths, widths[1:])])
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))
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


def boundary_counts(pred: torch.Tensor, label: torch.Tensor, k: int, tol: int) -> torch.Tensor:
    """[k, 4] counts (matched predicted, predicted, matched true, true) of boundary pixels per class, a match
    being within `tol` px (max-pool dilation of the other map)."""
    bp, bt = boundaries(pred, k).float(), boundaries(label, k).float()
    grow = lambda b: F.max_pool2d(b, 2 * tol + 1, 1, tol)  # noqa: E731
    return torch.stack([(bp * grow(bt)).sum((0, 2, 3)), bp.sum((0, 2, 3)), (bt * grow(bp)).sum((0, 2, 3)),
                        bt.sum((0, 2, 3))], 1)


def boundary_f(counts: torch.Tensor) -> float:
    """Mean over classes of the boundary F-score from boundary_counts summed over the set."""
    p = counts[:, 0] / counts[:, 1].clamp_min(1)
    r = counts[:, 2] / counts[:, 3].clamp_min(1)
    return (2 * p * r / (p + r).clamp_min(1e-12)).mean().item()


# -------------------------------------------------------------------------------------------- train

def upsampler_modules(model: Segmenter) -> list[nn.Module]:
    return list(getattr(model.neck, "upsample_modules", []))


def offset_probe(model: Segmenter):
    """Forward hooks that collect the mean |learned offset| (beyond the base grid) in input pixels, per
    upsampler, finest first."""
    seen, handles = {}, []
    for i, m in enumerate(upsampler_modules(model)):
        if isinstance(m, upsampler.LDAAQU):  # in output pixels: at scale 2, half an input pixel each
            scale, mod = m.range_factor / 2, m.conv_offset[-1]  # the forward calls its layers one by one
        elif isinstance(m, upsampler.DySample):
            scale, mod = None, m.offset
        else:
            continue
        handles.append(mod.register_forward_hook(
            lambda mod, inp, out, i=i, scale=scale:
            seen.setdefault(i, []).append((out.tanh() * scale if scale else out * 0.25).abs().mean().item())))
    return seen, handles


def train_one(name: str, seed: int, data, args, device) -> dict:
    (xtr, ytr), (xva, yva) = data
    torch.manual_seed(seed)
    model = Segmenter(name, args.width, backend=args.backend, **args.overrides.get(name, {})).to(device)
    params = sum(p.numel() for p in model.parameters())
    up_params = sum(p.numel() for m in upsampler_modules(model) for p in m.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    # outlines are a few percent of the pixels: ENet's class weights 1 / ln(1.02 + frequency), from the training set
    freq = torch.bincount(ytr.flatten(), minlength=len(CLASSES)).double() / ytr.numel()
    class_weight = (1 / torch.log(1.02 + freq)).float().to(device)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(xtr), generator=order), 0
    losses, times = [], []
    model.train()
    for step in range(args.steps):
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=order), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x, y = xtr[idx].to(device), ytr[idx].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y, weight=class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"  {name} seed {seed}: loss {losses[-1]} at step {step}, stopping this run")
            break
    model.eval()
    conf = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    bcounts = torch.zeros(len(CLASSES), 4)
    seen, handles = offset_probe(model)
    preds = []
    with torch.no_grad():
        for i in range(0, len(xva), 32):
            pred = model(xva[i:i + 32].to(device)).argmax(1).cpu()
            conf += confusion(pred, yva[i:i + 32], len(CLASSES))
            bcounts += boundary_counts(pred, yva[i:i + 32], len(CLASSES), args.tol)
            preds.append(pred)
    for h in handles:
        h.remove()
    m, ious = miou(conf)
    tail = max(1, len(losses) // 5)
    timed = times[min(len(times) - 1, max(2, len(times) // 10)):]  # after warm-up: allocator, first-call set-up
    return dict(upsampler=name, seed=seed, params=params, upsampler_params=up_params,
                ms_per_step=1e3 * statistics.fmean(timed), ms_per_step_median=1e3 * statistics.median(timed),
                miou=m, boundary_f=boundary_f(bcounts),
                **{f"iou_{c}": v for c, v in zip(CLASSES, ious)},
                loss_start=statistics.fmean(losses[:tail]), loss_end=statistics.fmean(losses[-tail:]),
                offset_px="/".join(f"{statistics.fmean(seen[i]):.2f}" for i in sorted(seen)), losses=losses,
                pred=torch.cat(preds))


# ------------------------------------------------------------------------------------------ outputs

def where(meta: dict) -> str:
    n = meta["threads"]
    return meta["device"] + (f", {n} thread{'s' * (n > 1)}" if meta["device"].startswith("CPU") else "")


def _fmt(vals, digits=3):
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(results: list[dict], meta: dict, args) -> str:
    names = list(dict.fromkeys(r["upsampler"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    lines = [f"{where(meta)}, torch {meta['torch']}, triton {meta['triton']}, backend \"{args.backend}\" = "
             f"{meta['backend']}; {args.steps} steps, batch {args.batch}, {args.size}x{args.size} px, width "
             f"{args.width}, seeds {' '.join(map(str, seeds))}" + "".join(f", {item}" for item in args.set)
             + (" (mean ± std over seeds)." if len(seeds) > 1 else "."),
             "",
             "| upsampler | val mIoU | boundary F (±" + str(args.tol) + " px) | IoU ring / line / polygon "
             "| params (upsamplers) | ms / step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n in names:
        rs = [r for r in results if r["upsampler"] == n]
        thin = " / ".join(f"{statistics.fmean(r[f'iou_{c}'] for r in rs):.2f}" for c in CLASSES[1:])
        lines.append(f"| {n} | {_fmt([r['miou'] for r in rs])} | {_fmt([r['boundary_f'] for r in rs])} | {thin} "
                     f"| {rs[0]['params']:,} ({rs[0]['upsampler_params']:,}) "
                     f"| {statistics.fmean(r['ms_per_step'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def write_csv(path: str, results: list[dict], meta: dict, args):
    """Rows of other devices are kept; this device's are replaced."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["device"] != meta["device"]]
    for r in results:
        rows.append({**meta, **{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS}})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def figure(path: str, results: list[dict], val: tuple[torch.Tensor, torch.Tensor], meta: dict, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = list(dict.fromkeys(r["upsampler"] for r in results))
    cmap = ListedColormap(["#202020", "tab:orange", "tab:cyan", "tab:pink"])
    colours = [f"C{i}" for i in range(len(names))]
    fig = plt.figure(figsize=(2.2 * (len(names) + 2), 7.2))
    outer = fig.add_gridspec(2, 1, height_ratios=[1.25, 1])
    top = [fig.add_subplot(g) for g in outer[0].subgridspec(1, 3, wspace=0.3)]
    bottom = outer[1].subgridspec(1, len(names) + 2)
    for ax, key, title in ((top[0], "miou", "val mIoU"), (top[1], "boundary_f", f"boundary F (±{args.tol} px)")):
        vals = [[r[key] for r in results if r["upsampler"] == n] for n in names]
        err = [statistics.stdev(v) if len(v) > 1 else 0 for v in vals]
        ax.bar(names, [statistics.fmean(v) for v in vals], yerr=err, capsize=4, color=colours)
        lo = min(min(v) for v in vals)
        ax.set_ylim(max(0, lo - 0.1), min(1, max(max(v) for v in vals) + 0.05))
        ax.set_title(title + (f", mean ± std over {len(vals[0])} seeds" if len(vals[0]) > 1 else ""))
        ax.tick_params(axis="x", rotation=30)
    for n, colour in zip(names, colours):
        loss = torch.tensor(next(r["losses"] for r in results if r["upsampler"] == n))
        k = max(1, len(loss) // 20)
        smooth = F.avg_pool1d(loss[None, None], k, 1).flatten() if len(loss) >= k else loss
        top[2].plot(torch.arange(len(smooth)) + k - 1, smooth, label=n, color=colour)
    top[2].set_title(f"training loss (seed {args.seeds[0]}, running mean)")
    top[2].set_xlabel("step")
    top[2].legend(fontsize=8)
    img, label = val[0][args.show], val[1][args.show]
    panels = [("val image", (img.permute(1, 2, 0) * 0.35 + 0.5).clamp(0, 1)), ("truth", label)]
    panels += [(n, next(r["pred"] for r in results if r["upsampler"] == n)[args.show]) for n in names]
    for i, (title, im) in enumerate(panels):
        ax = fig.add_subplot(bottom[i])
        ax.imshow(im.numpy(), **({} if im.dim() == 3 else dict(cmap=cmap, vmin=0, vmax=len(CLASSES) - 1)),
                  interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{where(meta)}, torch {meta['torch']}, backend {meta['backend']}: {args.steps} steps, "
                 f"{args.size}x{args.size} px; classes: orange ring, cyan line, pink polygon", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny end-to-end run (CI): 2 upsamplers, a few steps")
    ap.add_argument("--upsamplers", nargs="+", choices=UPSAMPLERS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data-seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=48, help="image side in pixels")
    ap.add_argument("--width", type=int, default=24, help="FPN channels (encoder 12, 12, 24, 36 at 24)")
    ap.add_argument("--train", type=int, default=1024, help="training images")
    ap.add_argument("--val", type=int, default=128, help="validation images")
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--tol", type=int, default=1, help="boundary match tolerance in pixels")
    ap.add_argument("--set", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="an upsampler argument off its paper's default, e.g. lda_aqu.range_factor=2 (for diagnosis: "
                         "the comparison itself leaves them all at their defaults)")
    ap.add_argument("--backend", default="auto", choices=upsampler.functional.BACKENDS, help="the upsamplers' backend")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default 2, 1 with --quick")
    ap.add_argument("--show", type=int, default=0, help="validation image in the figure")
    ap.add_argument("--out", help="default results/compare (results/compare-quick with --quick)")
    args = ap.parse_args(argv)
    args.out = args.out or ("results/compare-quick" if args.quick else "results/compare")
    if args.quick:
        args.steps, args.batch, args.size, args.width, args.train, args.val = 10, 2, 32, 8, 16, 8
    args.overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, kw = key.partition(".")
        if name not in UPSAMPLERS or not kw.isidentifier() or not value:
            raise SystemExit(f"--set takes NAME.KEY=VALUE with NAME one of {UPSAMPLERS}, got {item!r}")
        args.overrides.setdefault(name, {})[kw] = ast.literal_eval(value)
    args.threads = args.threads or (1 if args.quick else 2)  # tiny maps gain nothing from a second thread
    args.upsamplers = args.upsamplers or (("nearest", "lda_aqu") if args.quick else UPSAMPLERS)
    if args.width % 8:
        raise SystemExit(f"--width must be a multiple of 8 (LDA-AQU's groups, CARAFE's compressor), got {args.width}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import triton
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
                threads=args.threads, torch=torch.__version__, triton=triton.__version__,
                backend=select_backend(args.backend, torch.zeros(1, device=device)), date=time.strftime("%Y-%m-%d"),
                steps=args.steps, batch=args.batch, size=args.size, width=args.width, set=" ".join(args.set))
    t0 = time.perf_counter()
    data = (make_dataset(args.train, args.size, args.data_seed), make_dataset(args.val, args.size, args.data_seed + 1))
    frac = (data[0][1] > 0).float().mean().item()
    print(f"{meta['device']} ({platform.processor() or platform.machine()}), torch {meta['torch']}, triton "
          f"{meta['triton']}, backend {args.backend} = {meta['backend']}; data: {args.train} train / {args.val} val "
          f"images {args.size}x{args.size}, {100 * frac:.1f}% thin-structure pixels ({time.perf_counter() - t0:.1f} s)")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for seed in args.seeds:
        for name in args.upsamplers:
            t = time.perf_counter()
            r = train_one(name, seed, data, args, device)
            results.append(r)
            print(f"  {name:9s} seed {seed}: mIoU {r['miou']:.3f}, boundary F {r['boundary_f']:.3f}, loss "
                  f"{r['loss_start']:.3f} -> {r['loss_end']:.3f}, {r['ms_per_step']:.0f} ms/step"
                  + (f", offsets {r['offset_px']} px" if r["offset_px"] else "") + f" "
                  f"({time.perf_counter() - t:.0f} s)")
            text = report(results, data[1], meta, args)  # after every run: an interrupted run keeps what it did
    print("\n" + text)
    print(f"wrote {args.out}/compare.csv, TABLE.md, compare.png in {time.perf_counter() - t0:.0f} s "
          f"(timings on a shared machine are noisy)")


def report(results, val, meta, args) -> str:
    write_csv(os.path.join(args.out, "compare.csv"), results, meta, args)
    text = table(results, meta, args)
    with open(os.path.join(args.out, "TABLE.md"), "w") as f:
        f.write(text)
    figure(os.path.join(args.out, "compare.png"), results, val, meta, args)
    return text


if __name__ == "__main__":
    main()
