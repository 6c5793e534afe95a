"""Every run records what produced its numbers: package versions, torch's kernels and the device."""

from __future__ import annotations

import torch

from src.environment import PACKAGES, cpu_info, describe, environment, package_versions


def test_the_environment_names_versions_kernels_and_device():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__ and set(env["packages"]) == set(PACKAGES)
    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"]["threads"] == torch.get_num_threads() and env["cpu"]["logical_cores"] >= 1
    line = describe(env)
    assert f"torch {torch.__version__}" in line and env["packages"]["transformers"] in line
    assert (env["torch"]["cpu_capability"] in line) != bool(env["cuda_devices"])


def test_missing_packages_are_none_not_guessed(monkeypatch):
    monkeypatch.setattr("src.environment.PACKAGES", ("torch", "no-such-distribution-here"))
    assert package_versions() == {"torch": torch.__version__, "no-such-distribution-here": None}


def test_cpu_info_reads_model_and_kernel_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu\n"
    )
    info = cpu_info(x86)
    assert info["model"] == "Example CPU 9000" and info["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert cpu_info(arm)["flags"] == ["asimd", "sve"]
    assert cpu_info(tmp_path / "absent")["flags"] == []


def test_describe_names_gpus_when_there_are_some():
    env = {
        "python": "3.11.7",
        "packages": {"torch": "2.13.0", "transformers": "5.25.0"},
        "torch": {"cuda": "12.8", "cpu_capability": "AVX512", "threads": 16},
        "cpu": {"model": "x"},
        "cuda_devices": [{"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gb": 79.1}] * 2,
    }
    line = describe(env)
    assert "2 x NVIDIA H100 80GB HBM3 (CUDA 12.8)" in line and "AVX512" not in line
