"""What produced a number: the package versions that shape it and the device it ran on.

Every run writes this (`run_summary.json`, `report.json`, `comparison.json`, and one line in `report.md` /
`comparison.md`), because small numerical differences (another CPU's kernels, another transformers release) can
change a training trajectory: a figure without its environment cannot be checked. `constraints.txt` at the
repository root pins the versions the documented figures were made with (`make setup` installs with it).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
from pathlib import Path
from typing import Any

# the distributions whose versions change what a run computes, or how it reads and writes its data
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "lightning",
    "peft",
    "numpy",
    "pillow",
    "safetensors",
    "datasets",
    "hydra-core",
    "omegaconf",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
)
# CPU instruction-set flags that decide which kernels torch runs (and so the rounding of a CPU run)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def package_versions() -> dict[str, str | None]:
    """``PACKAGES`` -> installed version (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and its kernel-relevant flags (Linux's /proc/cpuinfo; elsewhere what `platform` says)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "logical_cores": os.cpu_count()}


def environment() -> dict[str, Any]:
    """Python, the packages of `PACKAGES`, torch's build and threads, the CPU and any CUDA devices."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
        "cpu": cpu_info(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["cuda_devices"].append(
                {
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gb": round(props.total_memory / 2**30, 1),
                }
            )
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for a markdown report: the versions that matter most and the device."""
    packages = env.get("packages") or {}
    names = ("torch", "transformers", "lightning", "peft", "numpy")
    versions = ", ".join(f"{n} {packages[n]}" for n in names if packages.get(n))
    torch_info = env.get("torch") or {}
    if env.get("cuda_devices"):
        gpus = env["cuda_devices"]
        device = f"{len(gpus)} x {gpus[0]['name']} (CUDA {torch_info.get('cuda')})"
    else:
        cpu = env.get("cpu") or {}
        kernels, threads = torch_info.get("cpu_capability"), torch_info.get("threads")
        device = f"CPU {cpu.get('model')} ({kernels} kernels, {threads} threads)"
    return f"Python {env.get('python')}, {versions}; {device}"
