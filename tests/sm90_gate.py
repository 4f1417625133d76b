"""The sm_90a compile gate: every Triton launcher configuration gist_fast can choose, compiled for the H100
on a machine without a GPU, with its shared memory, registers, spills and atomics read back.

Run as a script (tests/test_sm90_gate.py does, in a subprocess: the test process runs Triton under
TRITON_INTERPRET=1). The real launchers run on CPU tensors against a stand-in driver that reports an H100
(sm_90, 132 SMs) and launches nothing, so each configuration is specialised and compiled exactly as on the
GPU. Triton's cache and the `ptxas -v` results are kept under the cache folder, so a second run costs seconds.

    python tests/sm90_gate.py REPORT.json [--shard i/n]
"""
import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PINNED_TRITON = "3.6.0"  # the GPU machine's triton: gate with the compiler the H100 runs
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gist_fast" / "sm90-gate"
H100_SHARED_BYTES = 232_448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
H100_SMS = 132
ADAPTER_DIM = 768  # ViT-B; any D divisible by 16 specialises the same way
ADAPTER_ROWS = 256
SSF_DIMS = (768, 2304, 3072)  # ViT-B's SSF sites: D (norms, proj, fc2), 3D (qkv), 4D (fc1, with the GELU)
LORA_HEADS = 12  # ViT-B: D = 768, d_h = 64
LORA_RANKS = (1, 4, 8, 16, 32, 64)  # every BLOCK_R up to lora_qv.MAX_RANK; 4, 8 and 64 are the ones in use
LORA_HEAD_DIMS = (16, 32, 48, 80, 88, 96, 128)  # other heads at the largest rank: every BLOCK_DH, and d_h = 88
# (ViT-g) not divisible by 16


def _dtype_sets():
    """name -> (dtype of x and base, of branch, of the adapter and norm parameters, dot_dtype) the launchers get.
    "autocast-bf16": the fp32 residual stream and fp32 weights under torch.autocast(bf16), a bf16 attention/MLP
    branch, and the autocast dtype the ops layer passes for the adapter's two linears."""
    import torch

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return {"bf16": (bf16, bf16, bf16, None), "fp16": (fp16, fp16, fp16, None), "fp32": (fp32, fp32, fp32, None),
            "autocast-bf16": (fp32, bf16, fp32, bf16)}


def training_path(family: str, dtypes: str, rank: int = 0) -> bool:
    """Configurations a training step runs, which must not spill: every loss kernel; the adapter, SSF and LoRA
    kernels at rank <= 64 (SSF: rank 0) in a 16-bit dtype or the autocast mix."""
    return family == "loss" or (rank <= 64 and dtypes != "fp32")


def configurations():
    """(label, run) for every launcher configuration; run() calls the real launcher once on CPU tensors."""
    for family in (_adapter_configurations, _loss_configurations, _ssf_configurations, _lora_configurations):
        yield from family()


def _adapter_configurations():
    """The adapter op, every rank and optional input."""
    import torch

    from gist_fast.kernels import adapter

    def adapter_case(dtypes, rank, has_base, has_branch, has_norm):
        """Uninitialised tensors: nothing runs, only the launcher's choices and the kernels' specialisation matter."""
        x_dt, br_dt, w_dt, dot_dtype = _dtype_sets()[dtypes]
        M, D = ADAPTER_ROWS, ADAPTER_DIM
        x = torch.empty(M, D, dtype=x_dt)
        wd, wu = torch.empty(rank, D, dtype=w_dt), torch.empty(D, rank, dtype=w_dt)
        bd, bu = torch.empty(rank, dtype=w_dt), torch.empty(D, dtype=w_dt)
        base = torch.empty_like(x) if has_base else None
        branch = torch.empty(M, D, dtype=br_dt) if has_branch else None
        nw = nb = torch.empty(D, dtype=w_dt) if has_norm else None
        return x, wd, bd, wu, bu, base, branch, nw, nb, dot_dtype

    def adapter_fwd(dtypes, rank, has_base, has_branch, has_norm):
        x, wd, bd, wu, bu, base, branch, nw, nb, dot = adapter_case(dtypes, rank, has_base, has_branch, has_norm)
        adapter.adapter_fwd(x, wd, bd, wu, bu, 0.1, base, branch, nw, nb, 1e-6, dot_dtype=dot)

    def adapter_bwd(dtypes, rank, x_is_base, has_norm, deterministic):
        x, wd, bd, wu, bu, _, branch, nw, _, dot = adapter_case(dtypes, rank, False, True, has_norm)
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, branch.dtype))
        stats = torch.empty(x.shape[0]) if has_norm else None
        adapter.adapter_bwd(torch.empty_like(out), torch.empty_like(out) if has_norm else None, x, wd, bd, wu, 0.1,
                            out if has_norm else None, nw, stats, stats, x_is_base,
                            dot_dtype=dot, atomic=not deterministic)

    for dtypes in _dtype_sets():
        for rank in range(1, adapter.MAX_RANK + 1):
            for has_base, has_branch, has_norm in itertools.product((False, True), repeat=3):
                yield (("adapter_fwd", dtypes, rank, f"base={has_base} branch={has_branch} norm={has_norm}"),
                       lambda a=(dtypes, rank, has_base, has_branch, has_norm): adapter_fwd(*a))
            for x_is_base, has_norm, det in itertools.product((False, True), repeat=3):
                yield (("adapter_bwd", dtypes, rank, f"x_is_base={x_is_base} norm={has_norm} deterministic={det}"),
                       lambda a=(dtypes, rank, x_is_base, has_norm, det): adapter_bwd(*a))


def _loss_configurations():
    """The pair losses, every class count around a power of two."""
    import torch

    from gist_fast.kernels import losses

    def loss(mode, dtype, classes, grad, reduction):
        B = 8
        a, b = torch.empty(B, classes, dtype=dtype), torch.empty(B, classes, dtype=dtype)
        target = torch.zeros(B, dtype=torch.long)
        loss_out, grad_a, grad_b, stats = losses.pair_loss_fwd(
            a, b, target, mode, 0.5, 0.75, 3.0, -100, reduction, grad)
        if grad:
            upstream = torch.ones(B) if reduction == "none" else torch.ones(())
            losses.pair_loss_bwd(upstream, grad_a, grad_b, stats, reduction)

    class_counts = sorted({c for k in range(1, 19) for c in (2 ** k, 2 ** k - 1, 2 ** k + 1) if 2 <= c <= 262_144})
    for mode, dtype_name, classes, grad, reduction in itertools.product(
            losses.MODES, ("bf16", "fp32"), class_counts, (False, True), losses.REDUCTIONS):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        yield (("pair_loss", dtype_name, 0, f"mode={mode} C={classes} grad={grad} reduction={reduction}"),
               lambda a=(mode, dtype, classes, grad, reduction): loss(*a))


def _ssf_configurations():
    """Scale_shift at the ViT widths."""
    import torch

    from gist_fast.kernels import scale_shift

    # SSF and LoRA act on sub-layer outputs: under autocast x / qkv come in the branch dtype (bf16), with the
    # parameters fp32
    def ssf(dtypes, dim, gelu, backward, deterministic):
        _, x_dt, w_dt, _ = _dtype_sets()[dtypes]
        x, scale, shift = torch.empty(ADAPTER_ROWS, dim, dtype=x_dt), *(torch.empty(dim, dtype=w_dt) for _ in range(2))
        if backward:
            scale_shift.scale_shift_bwd(torch.empty_like(x), x, scale, shift, gelu, atomic=not deterministic)
        else:
            scale_shift.scale_shift_fwd(x, scale, shift, gelu)

    for dtypes, dim, gelu in itertools.product(_dtype_sets(), SSF_DIMS, (False, True)):
        yield (("scale_shift", dtypes, 0, f"D={dim} gelu={gelu}"), lambda a=(dtypes, dim, gelu): ssf(*a, False, False))
        for det in (False, True):
            yield (("scale_shift_bwd", dtypes, 0, f"D={dim} gelu={gelu} deterministic={det}"),
                   lambda a=(dtypes, dim, gelu, det): ssf(a[0], a[1], a[2], True, a[3]))


def _lora_configurations():
    """Lora_qv at the ranks and head widths."""
    import torch

    from gist_fast.kernels import lora_qv

    def lora(dtypes, rank, head_dim, backward, deterministic):
        _, x_dt, w_dt, dot = _dtype_sets()[dtypes]
        qkv = torch.empty(ADAPTER_ROWS, 3 * LORA_HEADS * head_dim, dtype=x_dt)
        factors = [torch.empty(rank, head_dim, dtype=w_dt), torch.empty(head_dim, rank, dtype=w_dt)] * 2
        if backward:
            lora_qv.lora_qv_bwd(torch.empty_like(qkv), qkv, *factors, 1.0, LORA_HEADS, dot_dtype=dot,
                                atomic=not deterministic)
        else:
            lora_qv.lora_qv_fwd(qkv, *factors, 1.0, LORA_HEADS, dot_dtype=dot)

    shapes = [(r, 64) for r in LORA_RANKS] + [(lora_qv.MAX_RANK, d) for d in LORA_HEAD_DIMS]
    for dtypes, (rank, head_dim) in itertools.product(_dtype_sets(), shapes):
        yield (("lora_qv", dtypes, rank, f"d_h={head_dim}"), lambda a=(dtypes, rank, head_dim): lora(*a, False, False))
        for det in (False, True):
            yield (("lora_qv_bwd", dtypes, rank, f"d_h={head_dim} deterministic={det}"),
                   lambda a=(dtypes, rank, head_dim, det): lora(*a[:3], True, a[3]))


class _H100Driver:
    """Stands in for Triton's CUDA driver: reports an sm_90 device, launches nothing, and records which
    compiled kernel each configuration launches (launcher_cls is built once per compiled kernel)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = self
        self.current = None
        self.launched = {}  # compiled-kernel hash -> (CompiledKernel metadata, [labels])

    # driver API used by JITFunction.run and CompiledKernel._init_handles
    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_properties(self, device):  # no limit here: the gate reports every overflow instead of the first
        return {"max_shared_mem": 1 << 30, "multiprocessor_count": H100_SMS, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        return object(), object(), 0, 0, 1024

    def launcher_cls(self, src, metadata):
        def launch(*args, **kwargs):
            entry = self.launched.setdefault(metadata.hash, (metadata, []))
            entry[1].append(self.current)

        return launch


def _ptxas_usage(ptx: str, name: str) -> dict:
    """Registers and spill bytes from `ptxas -v` for sm_90a, cached by the PTX's hash."""
    from triton.backends.nvidia.compiler import get_ptxas

    key = hashlib.sha256(ptx.encode()).hexdigest()
    cached = CACHE / "ptxas" / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed on {name}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    usage = {"registers": int(regs.group(1)) if regs else None, "spill_bytes": max(spills, default=0)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(usage))
    return usage


def _atomics(ptx: str) -> dict:
    """Counts of atomic / reduction instructions by memory-ordering semantics."""
    ops = re.findall(r"^\s*(?:@%p\d+\s+)?(atom|red)\.([\w.]+)", ptx, flags=re.M)
    kinds = {"acq_rel": 0, "acquire": 0, "release": 0, "relaxed": 0}
    for _, qualifiers in ops:
        sem = next((k for k in ("acq_rel", "acquire", "release") if f".{k}." in f".{qualifiers}."), "relaxed")
        kinds[sem] += 1  # no ordering qualifier means .relaxed (PTX ISA, sm_70+)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th configuration from the i-th")
    args = parser.parse_args()
    shard, shards = (int(v) for v in args.shard.split("/"))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("sm90_gate compiles real kernels: unset TRITON_INTERPRET")

    import triton
    from triton.runtime.driver import driver

    os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / f"triton-{triton.__version__}"))
    h100 = _H100Driver()
    driver.set_active(h100)
    errors = []
    for i, (label, run) in enumerate(configurations()):
        if i % shards != shard:
            continue
        h100.current = label
        try:
            run()
        except Exception as e:  # a compile error is a gate failure, reported with its configuration
            errors.append({"config": list(label), "error": f"{type(e).__name__}: {e}"[:2000]})
    records = []
    for metadata, labels in h100.launched.values():
        kernel = _compiled(metadata.hash)
        usage = _ptxas_usage(kernel.asm["ptx"], metadata.name)
        records.append({
            "kernel": metadata.name, "hash": metadata.hash, "num_warps": metadata.num_warps,
            "num_stages": metadata.num_stages, "shared_bytes": metadata.shared, **usage,
            "atomics": _atomics(kernel.asm["ptx"]), "configs": [list(label) for label in labels],
            "training_path": any(training_path("loss" if lb[0] == "pair_loss" else lb[0], lb[1], lb[2])
                                 for lb in labels),
        })
    args.report.write_text(json.dumps({"triton": triton.__version__, "records": records, "errors": errors}, indent=1))


_KERNELS = {}


def _compiled(hash_: str):
    """The CompiledKernel with this hash, from the JIT caches of the launchers' kernels."""
    if not _KERNELS:
        from triton.runtime.jit import JITFunction

        from gist_fast.kernels import adapter, lora_qv, losses, scale_shift

        for module in (adapter, losses, scale_shift, lora_qv):
            for obj in vars(module).values():
                if isinstance(obj, JITFunction):
                    for cache in obj.device_caches.values():
                        for compiled in cache[0].values():
                            _KERNELS[compiled.metadata.hash] = compiled
    return _KERNELS[hash_]


if __name__ == "__main__":
    main()
