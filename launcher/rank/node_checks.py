"""What one node must have for the run's GPUs and optimizer, checked by `ftlaunch preflight`.

GPUs: counted as the ranks' torch will count them (`torch.cuda.device_count()` in this task's
environment: CUDA_VISIBLE_DEVICES with indices, GPU- or MIG- UUIDs, cgroups all honoured, which
nvidia-smi's indices are not), each with its model, compute capability and free memory as torch
reports them, and the node's driver version as nvidia-smi reports it (raw strings).

The optimizer, decided from the run file as the ranks decide it: optimizer state offloaded
(deepspeed.offload_optimizer) -> DeepSpeed's DeepSpeedCPUAdam, a C++ op compiled just in time
on first use unless DeepSpeed was installed with it prebuilt: it needs the op to be compatible
(`CPUAdamBuilder().is_compatible()`) and either built already (prebuilt, or in the extensions
cache) or a C++ compiler and ninja on the node; train.optimizer adamw_8bit / paged_adamw_8bit ->
bitsandbytes, whose native library must load for the node's CUDA; plain adamw on GPUs -> torch's
fused AdamW, which needs no compiler. Each check is a row {"check", "ok", "detail", "fix"}.

Rank half: torch, deepspeed and bitsandbytes are imported inside the functions.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Mapping, Optional


# ------------------------------------------------------------------ GPUs
def gpu_inventory() -> list[dict[str, Any]]:
    """The GPUs this task's ranks will see: [{"index", "name", "capability", "uuid", "free",
    "total"}] (bytes), in torch's order (the ranks' device indices)."""
    import torch
    gpus = []
    for i in range(torch.cuda.device_count()):   # 0 without CUDA or a driver
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": str(props.name),
                     "capability": f"{props.major}.{props.minor}",
                     "uuid": str(getattr(props, "uuid", "")), "free": int(free), "total": int(total)})
    return gpus


def driver_version(env: Mapping[str, str]) -> Optional[str]:
    """The NVIDIA driver version as nvidia-smi prints it (None without nvidia-smi)."""
    if not shutil.which("nvidia-smi", path=env.get("PATH")):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def cuda_versions() -> dict[str, Optional[str]]:
    """torch's CUDA runtime and the driver's CUDA version (as torch reads it), raw."""
    import torch
    driver = None
    if torch.cuda.is_available():
        try:
            v = int(torch._C._cuda_getDriverVersion())
            driver = f"{v // 1000}.{v % 1000 // 10}"
        except (AttributeError, RuntimeError):
            driver = None
    return {"torch_cuda": torch.version.cuda, "driver_cuda": driver}


# ------------------------------------------------------------------ the optimizer
def optimizer_kind(cfg: Any) -> str:
    """What the ranks' optimizer will be: "cpu_adam" (optimizer state offloaded), "bnb_8bit"
    (train.optimizer adamw_8bit / paged_adamw_8bit) or "torch_adamw"."""
    if cfg.train.optimizer != "adamw":
        return "bnb_8bit"
    if cfg.deepspeed.offload_optimizer != "none":
        return "cpu_adam"
    return "torch_adamw"


def _row(check: str, ok: bool, detail: str, fix: str = "") -> dict[str, Any]:
    return {"check": check, "ok": ok, "detail": detail, "fix": fix}


def _jit_built(name: str) -> Optional[str]:
    """The path of an op torch's JIT loader built already (TORCH_EXTENSIONS_DIR), else None."""
    from torch.utils import cpp_extension
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    if not os.path.isdir(root):
        return None
    for dirpath, _, files in os.walk(root):
        if os.path.basename(dirpath) == name and f"{name}.so" in files:
            return os.path.join(dirpath, f"{name}.so")
    return None


def cpu_adam_check() -> dict[str, Any]:
    """DeepSpeedCPUAdam (offloaded optimizer state): compatible, and built or buildable here."""
    check = "optimizer: DeepSpeedCPUAdam (deepspeed.offload_optimizer)"
    fix_build = ("install a C++ compiler (g++) and ninja (`pip install ninja`) on the compute "
                 "nodes, or install DeepSpeed with the op prebuilt: "
                 "DS_BUILD_CPU_ADAM=1 pip install deepspeed")
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import CPUAdamBuilder
        builder = CPUAdamBuilder()
    except Exception as exc:  # noqa: BLE001 - reported as the row
        return _row(check, False, f"cannot import DeepSpeed's CPUAdamBuilder: "
                    f"{type(exc).__name__}: {exc}", "install deepspeed on the compute nodes")
    if not builder.is_compatible(verbose=False):
        why = "; ".join(str(x) for x in getattr(builder, "error_log", None) or []) or "no reason given"
        return _row(check, False, f"DeepSpeed's cpu_adam op is not compatible with this node: {why}",
                    "use deepspeed.offload_optimizer: none, or fix what DeepSpeed names")
    if installed_ops.get(builder.name, False):
        return _row(check, True, "cpu_adam prebuilt with DeepSpeed")
    built = _jit_built(builder.name)
    if built:
        return _row(check, True, f"cpu_adam built already ({built})")
    from torch.utils.cpp_extension import is_ninja_available
    cxx = os.environ.get("CXX", "c++")
    missing = [what for what, ok in ((f"C++ compiler ({cxx})", shutil.which(cxx) is not None),
                                     ("ninja", is_ninja_available())) if not ok]
    if missing:
        return _row(check, False, "cpu_adam is compiled on first use, and this node has no "
                    + " and no ".join(missing), fix_build)
    return _row(check, True, f"cpu_adam compiled on first use ({cxx}, ninja): about a minute, "
                "once per node and extensions cache")


def bnb_check(gpu: bool) -> dict[str, Any]:
    """bitsandbytes' 8-bit AdamW: the package imports and, on GPUs, its native library loaded."""
    check = "optimizer: bitsandbytes 8-bit AdamW (train.optimizer)"
    fix = ("install a bitsandbytes wheel built for the node's CUDA (pip install bitsandbytes), "
           "or use train.optimizer: adamw")
    try:
        import bitsandbytes
        from bitsandbytes import cextension
    except Exception as exc:  # noqa: BLE001 - reported as the row
        return _row(check, False, f"bitsandbytes does not import: {type(exc).__name__}: {exc}", fix)
    lib = cextension.lib
    if isinstance(lib, cextension.ErrorHandlerMockBNBNativeLibrary):
        if not gpu:
            return _row(check, True, f"bitsandbytes {bitsandbytes.__version__}, CPU ranks")
        msg = str(getattr(lib, "error_msg", "") or "not loaded").strip().splitlines()[0]
        return _row(check, False, f"bitsandbytes' native library did not load: {msg}", fix)
    cuda = bool(getattr(lib, "compiled_with_cuda", False))
    if gpu and not cuda:
        return _row(check, False, "bitsandbytes' native library loaded is a CPU build: its 8-bit "
                    "optimizers cannot run on the GPUs", fix)
    return _row(check, True, f"bitsandbytes {bitsandbytes.__version__}, native library loaded"
                f"{' (CUDA)' if cuda else ''}")


def optimizer_checks(cfg: Any, gpu: bool) -> list[dict[str, Any]]:
    """The rows for the run's optimizer on this node."""
    kind = optimizer_kind(cfg)
    if kind == "cpu_adam":
        return [cpu_adam_check()]
    if kind == "bnb_8bit":
        return [bnb_check(gpu)]
    return [_row("optimizer: AdamW", True, "torch's fused AdamW on GPUs (no compiler needed)"
                 if gpu else "torch's AdamW on CPU ranks")]
