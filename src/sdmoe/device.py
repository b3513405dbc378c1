"""Where a command computes and in which precision: `--device` and `loop.precision`, resolved once.

Every command takes the same device names (`auto` picks CUDA when torch sees one,
else the CPU) and resolves them here, so "cuda but no GPU" is the same one-line
error everywhere. `check_device_name` imports no torch: a config is checked before
torch loads.

On CUDA the forward and backward run under bf16 autocast by default (weights,
gradients, optimizer state and the SD-MoE split stay float32); on the CPU they run
in float32, where bf16 is slower. The experts' kernel follows the device too:
transformers' `grouped_mm` on CUDA (one grouped GEMM over all experts), `eager` on
the CPU: the reference kernel every architecture has, with which every recorded
result and loss trace here was made (`grouped_mm` is 1.0-1.2x faster on 2 CPU cores,
docs/performance.md section 2: a run may ask for it).
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from sdmoe.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (CUDA when torch sees a GPU, else the CPU) | cpu | cuda | cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """`name` if it is a device this project runs on, else a one-line error (no torch import)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"unknown device {name!r}; choose {DEVICE_HELP}")
    return name


def resolve_device(name: str = "auto") -> "torch.device":
    """The torch device `name` stands for on this machine; a one-line error when it is not there."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but torch {torch.__version__} sees no CUDA GPU on this machine; "
                        "use --device cpu (or auto), or install a CUDA build of torch")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of those")
    return device


def uses_bf16(precision: str, device: "torch.device") -> bool:
    """Whether the forward/backward run under bf16 autocast: `auto` means on CUDA only."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: str, device: "torch.device") -> AbstractContextManager:
    """The forward/backward's autocast context for `precision` (auto | fp32 | bf16) on `device`."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(precision, device) else nullcontext()


def experts_kernel(choice: str, device: "torch.device") -> str:
    """transformers' expert implementation for `choice` (auto | eager | batched_mm | grouped_mm) on `device`."""
    if choice != "auto":
        return choice
    return "grouped_mm" if device.type == "cuda" else "eager"


def synchronize(device: "torch.device") -> None:
    """Wait for the device's queued work (timing only; the training step itself never waits)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: "torch.device") -> dict:
    """Device name and versions, for reports and benchmark records."""
    import torch

    out = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        import platform

        out.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return out


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get without swapping (Linux `MemAvailable`: free memory plus
    the page cache the kernel can drop); None where the system does not say."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
