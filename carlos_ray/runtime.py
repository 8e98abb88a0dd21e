"""Process set-up shared by the CLI, the Ray actors and the benchmarks: quiet third-party logs, a Ray to run on."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Silence the warnings and info logs of diffusers, transformers and peft (ours stay as configured)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local Ray; nothing if Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
