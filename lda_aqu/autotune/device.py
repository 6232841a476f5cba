"""The one name of a device in paths: results/<slug>/ (bench.py, scripts/gpu.sh) and the tuning
cache's file names (lda_aqu/autotune/cache.py). Imports nothing of the project, so a shell can ask cheaply."""
import re

import torch


def slug(name: str) -> str:
    """Lower case, every run of other characters than letters and digits one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device=None) -> str:
    """The GPU's name as a slug ("nvidia-h200"), of `device` or the current GPU; "cpu" without one."""
    if device is not None and torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return slug(torch.cuda.get_device_name(device))


if __name__ == "__main__":
    print(device_slug())
