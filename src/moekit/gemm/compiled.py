"""The grouped GEMM kernel compiled for Hopper (sm_90a) on any machine, no GPU needed, and what in
the result decides its speed: registers and spills, shared memory, programs that fit on one SM,
and whether the tensor-core MMAs (wgmma) stay asynchronous.

``python -m moekit.gemm.compiled`` prints this for every candidate tile configuration
(``--json`` for machines). Needs Triton's NVIDIA backend with its bundled ptxas and cuobjdump, and
``TRITON_INTERPRET`` unset (under the interpreter there is no compiler to ask).

``dots_in_flight`` counts the MMAs (``tl.dot``) that Triton leaves running past their loop
iteration instead of waiting for them right after issue: 0 for the serial FP8 loop, 1 for "pair"
(its odd block). ptxas serialises every wgmma of a kernel (a wait after each instruction, info
C7514 / C7515) when it cannot keep them in flight, e.g. when an in-flight accumulator is copied
or spilled: ``serialized``, and ``mma_groups`` (WARPGROUP.ARRIVE in the SASS) then exceeds the
number of dots. ``dot_loop_depth``: the fewest loops around an MMA, 1 when Triton has fused a
flattened config's tile and K loops (``TileConfig.flatten``), 2 otherwise; ``tma_stores``: output tiles
stored with TMA (a flattened config's full tiles).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from moekit.gemm import config as tiles
from moekit.gemm import kernel

# One H100/H200 SM: 64K 32-bit registers, 228 KiB of shared memory (1 KiB of it reserved per block).
_REGS_PER_SM, _SMEM_PER_SM, _SMEM_RESERVED, _THREADS_PER_SM = 65536, 233472, 1024, 2048
_LAYOUTS = {"dense": kernel.DENSE, "contiguous": kernel.CONTIGUOUS, "masked": kernel.MASKED}


def _signature(fp8: bool, cfg: tiles.TileConfig) -> tuple[dict, dict]:
    fn = kernel._grouped_gemm_kernel
    dt = "fp8e4nv" if fp8 else "bf16"
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name == "a_desc":
            sig[name] = f"tensordesc<{dt}[{cfg.block_m}, {cfg.block_k}]>"
        elif name == "b_desc":
            sig[name] = f"tensordesc<{dt}[{cfg.block_n}, {cfg.block_k}]>"
        elif name == "out_desc":  # read only by flattened configs, which store full tiles with TMA
            sig[name] = f"tensordesc<bf16[{cfg.block_m}, {cfg.block_n}]>"
        elif name == "out_ptr":
            sig[name] = "*bf16"
        elif name in ("sa_ptr", "sb_ptr"):
            sig[name] = "*fp32"
        elif name in ("m_indices_ptr", "masked_m_ptr", "row_tiles_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
        # What Triton's launcher specialises on at run time: 16-byte aligned pointers, and sizes
        # and strides divisible by 16 (true for DeepSeek shapes).
        if sig[name].startswith("*") or name in ("N", "K", "stride_og", "stride_om"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(layout: str, fp8: bool, cfg: tiles.TileConfig):
    """triton CompiledKernel of ``_grouped_gemm_kernel`` for sm_90a with these constants."""
    if kernel.interpreting():
        raise RuntimeError("moekit.gemm.compiled needs TRITON_INTERPRET unset before triton is imported")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = _signature(fp8, cfg)
    constants = {"LAYOUT": _LAYOUTS[layout], "FP8": fp8, "UPCAST_BF16": False, "BLOCK_M": cfg.block_m,
                 "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                 "K_LOOP": kernel.K_LOOP_IDS[cfg.k_loop] if fp8 else 0, "FLATTEN": cfg.flatten,
                 "TMA_STORE": cfg.flatten}
    for name in constants:
        sig[name] = "constexpr"
    src = ASTSource(kernel._grouped_gemm_kernel, sig, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _ptxas_log(ptx: str) -> str:
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _dot_loop_depth(ttgir: str) -> int:
    """The fewest loops (scf.for) around an MMA in the TTGIR: 2 for tile loops that hold a K loop, 1
    once Triton has fused a tile loop with its K loop (a flattened config)."""
    stack: list[bool] = []
    depths = []
    for line in ttgir.splitlines():
        text = line.strip()
        if "ttng.warp_group_dot " in text:
            depths.append(sum(stack))
        if text.startswith("}"):
            stack.pop()
        if text.endswith("{"):
            stack.append("scf.for" in text)
    return min(depths, default=0)


def report(layout: str, fp8: bool, cfg: tiles.TileConfig) -> dict:
    """Registers, spills, shared memory, programs per SM and the MMA pipeline of one compiled kernel."""
    compiled = compile_kernel(layout, fp8, cfg)
    log = _ptxas_log(compiled.asm["ptx"])
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    sass = compiled.asm["sass"]
    smem = compiled.metadata.shared
    threads = 32 * cfg.num_warps
    regs_per_warp = -(-regs * 32 // 256) * 256
    fit = min(_REGS_PER_SM // (regs_per_warp * cfg.num_warps), _SMEM_PER_SM // (smem + _SMEM_RESERVED),
              _THREADS_PER_SM // threads)
    ttgir = compiled.asm["ttgir"]
    dots = re.findall(r"(%[\w#]+) = ttng\.warp_group_dot ", ttgir)
    waited = set(re.findall(r"ttng\.warp_group_dot_wait (%[\w#]+)", ttgir))
    return {"layout": layout, "fp8": fp8, "config": cfg.name, "regs": regs,
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else 0,
            "smem": smem, "fit_per_sm": fit, "dots": len(dots),
            # dots that Triton leaves in flight past their iteration (not waited for right after)
            "dots_in_flight": sum(d not in waited for d in dots), "dot_loop_depth": _dot_loop_depth(ttgir),
            "tma_stores": ttgir.count("ttng.async_tma_copy_local_to_global"),
            "mma_groups": sass.count("WARPGROUP.ARRIVE"), "mma_waits": sass.count("WARPGROUP.DEPBAR"),
            "serialized": bool(re.search(r"C751[0-9].*serialized", log))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit.gemm.compiled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["contiguous"], choices=sorted(_LAYOUTS))
    parser.add_argument("--bf16", action="store_true", help="also the bf16 candidates")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    configs = []
    for fp8 in (True, False) if args.bf16 else (True,):
        for rows in (32, 4096):
            configs += [(fp8, c) for c in tiles.candidates(fp8, rows, contiguous=True) if (fp8, c) not in configs]
    for layout in args.layouts:
        for fp8, cfg in configs:
            row = report(layout, fp8, cfg)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{layout:10} {'fp8 ' if fp8 else 'bf16'} {cfg.name:28} regs {row['regs']:3}  "
                      f"spill {row['spill_bytes']:4} B  smem {row['smem'] // 1024:3} KiB  fit/SM {row['fit_per_sm']}  "
                      f"dots {row['dots']} in flight {row['dots_in_flight']} in loops {row['dot_loop_depth']}  "
                      f"mma groups {row['mma_groups']:2}"
                      f"{'  SERIALISED' if row['serialized'] else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
