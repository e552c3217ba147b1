"""The machine a benchmark ran on, recorded in its JSON beside the figures."""

import os
import platform

import numpy as np
import torch


def describe() -> dict:
    """CPU model, cores, GPU, thread counts and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import faiss

        faiss_info = {"faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}
    except ImportError:
        faiss_info = {"faiss": None}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        **faiss_info,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
