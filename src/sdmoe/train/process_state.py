"""torch's process-wide settings for one run, put back when it ends.

torch keeps the thread count, the deterministic-algorithms flag and the random generator per process. A
run sets all three from its `loop` section; without putting them back, the next run in the same process
(a compare trains many) would start from this one's thread count, and a caller's random stream would go on
from where the run left the generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sdmoe.train.config import LoopConfig


@contextmanager
def process_state(loop: LoopConfig, device: torch.device | str = "cpu") -> Iterator[None]:
    """Within the block: `loop.threads` threads (0: the count as it was), deterministic algorithms as
    `loop.deterministic` says (warning where an op has no deterministic kernel), the generators seeded
    with `loop.seed`. After it, however it ends: the thread count, the flag and the generator states (the
    CPU's, and `device`'s if it is a GPU) as they were."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # the run's own GPU only: forking every visible GPU's state would open a context on each of them
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        try:
            if loop.threads > 0:
                torch.set_num_threads(loop.threads)
            torch.use_deterministic_algorithms(loop.deterministic, warn_only=True)
            torch.manual_seed(loop.seed)
            yield
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
