"""Carried anywhere: CPU features on macOS (sysctl), a compiler without OpenMP (Apple clang), and
the kernels built so still equal to PyTorch's products."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from gptforge.cpu import sysctl_flags

INTEL_MAC = """machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz
machdep.cpu.features: FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV SSE SSE2 SSE3 FMA AVX1.0 F16C RDRAND
machdep.cpu.leaf7_features: RDWRFSGS TSC_THREAD_OFFSET SGX BMI1 AVX2 SMEP BMI2 ERMS INVPCID FPU_CSDS MPX
"""
APPLE_SILICON = """hw.optional.AdvSIMD: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_I8MM: 0
hw.optional.arm.FEAT_SVE: 0
"""


def test_macos_features_read_from_sysctl():
    assert sysctl_flags(INTEL_MAC) == {"fma", "f16c", "avx2"}
    assert sysctl_flags(APPLE_SILICON) == {"asimd", "asimddp", "bf16"}
    assert sysctl_flags("") == frozenset()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_a_compiler_without_openmp_builds_one_thread_kernels(tmp_path):
    # A stand-in for Apple clang: the system compiler, refusing -fopenmp as Apple's does.
    fake = tmp_path / "apple-clang"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "unsupported option' \
                    f" '-fopenmp'\" >&2; exit 1; }}; done\nexec {shutil.which('cc')} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    code = textwrap.dedent("""
        import torch
        from gptforge.fast import kernels
        print(kernels.describe())
        if kernels.available():
            x, w = torch.randn(3, 128), torch.randn(40, 128)
            y = kernels.linear(x, kernels.layer("f32", 40, 128, w))
            print(torch.allclose(y, x @ w.T, rtol=1e-4, atol=1e-4))
    """)
    env = {**os.environ, "CC": str(fake), "GPTFORGE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    if lines[0].startswith("not for this CPU"):
        pytest.skip(lines[0])
    assert lines[0].endswith("(no OpenMP: one thread)"), lines
    assert lines[1] == "True"
