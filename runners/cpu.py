"""What CPU this process runs on, in the words that decide int8 and training speed.

The same int8 graph runs through different ONNX Runtime kernels on each CPU class (AVX2 alone,
AVX-512, AVX-512 VNNI, AMX), and bf16 training is fast only with native bf16: a figure is
meaningful only with the CPU that produced it. The model's metadata names the CPU it was built
on, `model-info` names both that one and the one serving, and the benchmarks name theirs.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The flags that change which kernels run, in the order of the classes they define.
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@lru_cache
def describe_cpu() -> dict[str, str | list[str]]:
    """Model name, vendor, family and model number, the flags that matter, and the class:
    `amx`, `avx512-vnni`, `avx512`, `avx2` or `other` (the best it has)."""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor speaks for all
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "flags":
            flags = set(value.split())
        else:
            fields.setdefault(key, value)
    present = [flag for flag in FLAGS_THAT_MATTER if flag in flags]
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id", "unknown"),
        "family": fields.get("cpu family", "unknown"),
        "model_number": fields.get("model", "unknown"),
        "flags": present,
        "class": cpu_class(present),
    }


def cpu_class(flags: list[str]) -> str:
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def cpu_summary() -> str:
    """One line for logs and reports: `AMD EPYC (family 25, model 1; avx2 fma; class avx2)`."""
    cpu = describe_cpu()
    return (
        f"{cpu['model']} (family {cpu['family']}, model {cpu['model_number']}; "
        f"{' '.join(cpu['flags']) or 'no AVX2'}; class {cpu['class']})"
    )
