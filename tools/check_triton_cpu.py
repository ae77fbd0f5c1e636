"""Check ringbook's Triton kernels without a GPU: compile them for an sm_90 target and run their self-check on the CPU.

    pip install --target /tmp/trpkg --no-deps triton          # once; the CPU torch wheel has no triton
    PYTHONPATH=/tmp/trpkg python tools/check_triton_cpu.py

Two checks of :mod:`ringbook.fast.triton_merge` (the merge and the gradient sum):

1. each kernel, in both its ``INIT`` forms and with 1 to 8 blocks per pass, compiles ahead of time to a cubin
   for an H100 (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``): what the GPU would compile;
2. the merge's own self-check (:func:`ringbook.fast.merge._self_check_triton`, the one that decides on a GPU
   whether the Triton merge is used) passes under Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the
   CPU), in a subprocess so that the interpreter is on before the kernels are defined (as
   ``tests/test_production.py::test_triton_merge_agrees_with_torch_merge_in_the_interpreter`` does where
   triton is installed; CI's CPU torch has none, so that test skips there).

Device time is scarce; this catches a kernel that does not compile or computes the wrong thing before a GPU
session does. Exit status 0 when both pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SELF_CHECK = ("import torch; from ringbook.fast import merge, triton_merge as t; "
              "r = merge._self_check_triton(t.merge_boxes_into_triton_, torch.device('cpu'), t.add_boxes_into_triton_); "
              "print(r); raise SystemExit(0 if r is True else 1)")


def _signature(fn, const: dict, pointer) -> dict:
    return {n: "constexpr" if n in const else pointer(n) or "i64" for n in fn.arg_names}


def compile_all() -> list[str]:
    """Compile every variant; the failures, as text."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ringbook.fast import triton_merge as tm

    target, failures = GPUTarget("cuda", 90, 32), []

    def merge_ptr(n):
        if n in ("acc_ptr", "acc_lse_ptr") or (n[0] == "l" and n[1:].isdigit()):
            return "*fp32"
        return "*bf16" if n[0] == "o" and n[1:].isdigit() else None

    def add_ptr(n):
        return "*fp32" if n == "acc_ptr" else "*bf16" if n[0] == "g" and n[1:].isdigit() else None

    variants = [(tm._merge_kernel, {"D": 64, "BLOCK_D": 64, "BLOCK_R": 16, "G": g, "INIT": init}, merge_ptr)
                for g in range(1, tm.MAX_BLOCKS + 1) for init in (False, True)]
    variants += [(tm._add_kernel, {"D": 64, "BLOCK_D": 64, "BLOCK_R": 32, "G": g}, add_ptr)
                 for g in range(1, tm.MAX_BLOCKS + 1)]
    for fn, const, ptr in variants:
        names = fn.arg_names
        src = ASTSource(fn=fn, signature=_signature(fn, const, ptr),
                        constexprs={(names.index(k),): v for k, v in const.items()})
        try:
            kernel = triton.compile(src, target=target)
            if "cubin" not in kernel.asm:
                failures.append(f"{fn.__name__} {const}: no cubin")
        except Exception as exc:  # noqa: BLE001 - every failing variant is reported
            failures.append(f"{fn.__name__} {const}: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"compiled {len(variants) - len(failures)} of {len(variants)} variants for sm_90")
    return failures


def main() -> int:
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not importable: see this script's docstring for how to install it beside the CPU torch")
        return 2
    failures = compile_all()
    for f in failures:
        print("FAILED", f)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", SELF_CHECK], env=env, capture_output=True, text=True, timeout=600)
    print("self-check under the interpreter:", (run.stdout.strip() or run.stderr.strip()[-500:]))
    return 0 if not failures and run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
