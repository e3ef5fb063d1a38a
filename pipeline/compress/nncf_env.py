"""Which fake-quant kernels NNCF uses on CUDA: its compiled extension, or its reference kernels.

NNCF compiles a CUDA extension the first time a quantiser runs on a GPU, with the ``nvcc`` that
torch's ``cpp_extension`` finds (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc`` on ``PATH``, else
``/usr/local/cuda``). When that toolkit's major version differs from the CUDA torch was built
with (``torch.version.cuda``), or there is no toolkit at all (common on inference and cloud
images), the build fails and QAT crashes mid-stage with ``nncf.InstallationError``. NNCF's pure
torch reference kernels compute the same fake quantisation (only slower), so: check the versions
first, try the build only when they match, and fall back to the reference kernels with a warning
otherwise (or when the build fails anyway). ``STAA_NNCF_KERNELS=reference`` forces the fallback
(e.g. to skip a minutes-long build in a time-boxed check); ``=extension`` forces the build.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.console import quiet_nncf

log = logging.getLogger("pipeline.qat")

ENV_OVERRIDE = "STAA_NNCF_KERNELS"  # auto (default) | reference | extension
_CHOSEN: dict[str, str] = {}  # device kind -> kernels in use, once decided in this process


@dataclass(frozen=True)
class KernelPlan:
    """What to use on CUDA and why (``kernels``: "extension" or "reference")."""

    kernels: str
    reason: str
    nvcc: str | None = None
    nvcc_version: str | None = None
    torch_cuda: str | None = None


def find_nvcc(env: Mapping[str, str] | None = None) -> str | None:
    """The ``nvcc`` torch's ``cpp_extension`` would build with (its own search order), or None."""
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        candidate = Path(home) / "bin" / "nvcc"
        return str(candidate) if candidate.is_file() else None
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str, timeout: float = 30.0) -> str | None:
    """``"12.4"`` from ``nvcc --version`` (its ``release X.Y`` line), or None when it does not answer."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out.stdout + out.stderr)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _major(version: str | None) -> str | None:
    return version.split(".")[0] if version else None


def plan_kernels(nvcc: str | None, torch_cuda: str | None, override: str = "auto") -> KernelPlan:
    """Decide from the toolkit found and torch's CUDA version (no build, no NNCF import)."""
    if override == "reference":
        return KernelPlan("reference", f"{ENV_OVERRIDE}=reference", nvcc, None, torch_cuda)
    if override == "extension":
        return KernelPlan("extension", f"{ENV_OVERRIDE}=extension", nvcc, None, torch_cuda)
    if override != "auto":
        raise ValueError(f"{ENV_OVERRIDE}={override!r}: expected auto, reference or extension")
    if nvcc is None:
        return KernelPlan("reference", "no CUDA toolkit (nvcc) found: set CUDA_HOME or put nvcc on PATH to build "
                                       "NNCF's CUDA extension", None, None, torch_cuda)
    version = nvcc_version(nvcc)
    if version is None:
        return KernelPlan("reference", f"{nvcc} --version did not report a release", nvcc, None, torch_cuda)
    if _major(version) != _major(torch_cuda):
        return KernelPlan("reference", f"nvcc {version} ({nvcc}) does not match torch's CUDA {torch_cuda}: NNCF's "
                                       f"extension would fail to build; install a CUDA {_major(torch_cuda)}.x "
                                       f"toolkit (CUDA_HOME) to use it", nvcc, version, torch_cuda)
    return KernelPlan("extension", f"nvcc {version} matches torch's CUDA {torch_cuda}", nvcc, version, torch_cuda)


def use_reference_kernels(namespace: object) -> bool:
    """Point an NNCF ``ExtensionNamespace`` at the reference kernels (no build). False if it is not one."""
    from nncf.torch.extensions import ExtensionNamespace
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    if not isinstance(namespace, ExtensionNamespace):
        return False
    namespace._loaded_namespace = ReferenceQuantizedFunctions  # what ExtensionNamespace.get() reads
    return True


def prepare_nncf_kernels(device: str) -> str:
    """Make NNCF's quantisers runnable on ``device``; returns "cpu", "cuda-extension" or "reference".

    Idempotent per process. On CUDA: builds (or loads the cached) extension when the toolkit
    matches torch, otherwise and on any build failure uses the reference kernels, with a warning.
    """
    if not str(device).startswith("cuda"):
        return "cpu"
    if "cuda" in _CHOSEN:
        return _CHOSEN["cuda"]
    import torch
    from nncf.torch.quantization import extensions
    quiet_nncf()  # importing nncf resets its logger: its build messages go to stage.log, not stdout

    namespace = extensions.QuantizedFunctionsCUDA
    plan = plan_kernels(find_nvcc(), torch.version.cuda, os.environ.get(ENV_OVERRIDE, "auto"))
    chosen = "reference"
    if plan.kernels == "extension":
        try:
            namespace.get("Quantize_forward")  # builds or loads now, not halfway through QAT
            chosen = "cuda-extension"
        except Exception as exc:  # nncf.InstallationError, a build timeout, a compiler error
            log.warning("NNCF's CUDA extension did not build (%s: %s); using NNCF's reference kernels "
                        "(same results, slower)", type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc)
                        else "no detail")
    else:
        log.warning("NNCF on CUDA: %s; using NNCF's reference kernels (same results, slower)", plan.reason)
    if chosen == "reference" and not use_reference_kernels(namespace):
        chosen = "cpu"  # torch sees no GPU: NNCF's CPU kernels run
    _CHOSEN["cuda"] = chosen
    return chosen


__all__ = ["KernelPlan", "find_nvcc", "nvcc_version", "plan_kernels", "use_reference_kernels",
           "prepare_nncf_kernels", "ENV_OVERRIDE"]
