"""The sm_90a compile gate (tests/sm90_gate.py): every Triton launcher configuration compiles for the H100 with
the GPU machine's triton, fits its shared memory, does not spill on the training paths and uses no acquire-release
atomics in its reductions. Runs without a GPU; the first run compiles (about four minutes on two cores), later runs
read Triton's cache (about 20 s)."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sm90_gate as gate  # noqa: E402

triton = pytest.importorskip("triton")


def _pinned_triton() -> str:
    """A folder holding triton==PINNED_TRITON for PYTHONPATH, installed once into the gate's cache; "" (the
    installed triton) when that is the pinned version or the package index cannot be reached."""
    if triton.__version__ == gate.PINNED_TRITON:
        return ""
    target = gate.CACHE / f"triton-{gate.PINNED_TRITON}-site"
    if not (target / "triton" / "__init__.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
               f"triton=={gate.PINNED_TRITON}"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            warnings.warn(f"sm90 gate: could not install triton=={gate.PINNED_TRITON} ({e}); "
                          f"gating with triton {triton.__version__}")
            return ""
    return str(target)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pinned = _pinned_triton()
    if pinned:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pinned, env.get("PYTHONPATH", "")) if p)
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, str(Path(gate.__file__)), str(folder / f"{i}.json"),
                               "--shard", f"{i}/{shards}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(shards)]
    logs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"sm90 gate crashed:\n{log[-4000:]}"
    parts = [json.loads((folder / f"{i}.json").read_text()) for i in range(shards)]
    return {"triton": parts[0]["triton"], "records": [r for p in parts for r in p["records"]],
            "errors": [e for p in parts for e in p["errors"]]}


def _describe(record) -> str:
    return (f"{record['kernel']} {record['configs'][0]} (+{len(record['configs']) - 1} configs): "
            f"warps {record['num_warps']}, stages {record['num_stages']}, shared {record['shared_bytes']} B, "
            f"{record['registers']} registers, {record['spill_bytes']} B spilled, atomics {record['atomics']}")


def _failures(report, bad) -> str:
    hits = [_describe(r) for r in report["records"] if bad(r)]
    return f"{len(hits)} kernels:\n" + "\n".join(hits[:20])


def test_gate_uses_the_gpu_machines_triton(report):
    if report["triton"] != gate.PINNED_TRITON:
        pytest.skip(f"triton {gate.PINNED_TRITON} could not be installed; gated with {report['triton']}")


def test_every_configuration_compiles(report):
    assert not report["errors"], "\n".join(f"{e['config']}: {e['error'][:500]}" for e in report["errors"][:10])
    families = {c[0] for r in report["records"] for c in r["configs"]}
    assert families == {"adapter_fwd", "adapter_bwd", "pair_loss", "scale_shift", "scale_shift_bwd", "lora_qv",
                        "lora_qv_bwd"}, families
    ranks = {c[2] for r in report["records"] for c in r["configs"] if c[0] == "adapter_bwd"}
    assert ranks == set(range(1, 257)), "every rank up to MAX_RANK reaches a compiled kernel"


def test_shared_memory_fits_an_h100(report):
    def too_big(r):
        return r["shared_bytes"] > gate.H100_SHARED_BYTES

    assert not any(map(too_big, report["records"])), _failures(report, too_big)


def test_no_register_spills_on_the_training_paths(report):
    def spills(r):
        return r["training_path"] and r["spill_bytes"] > 0

    assert not any(map(spills, report["records"])), _failures(report, spills)


def test_reductions_use_relaxed_atomics(report):
    """Weight-gradient atomics are relaxed (a plain reduction); the loss's completion ticket is the one
    acquire-release atomic there is, once per program, outside any loop."""
    def ordered(r):
        strong = r["atomics"]["acq_rel"] + r["atomics"]["acquire"] + r["atomics"]["release"]
        return strong > (1 if r["kernel"] == "_pair_loss_fwd_kernel" else 0)

    assert not any(map(ordered, report["records"])), _failures(report, ordered)
    relaxed = [r for r in report["records"] if r["kernel"] == "_adapter_bwd_kernel" and r["atomics"]["relaxed"]]
    assert relaxed, "the atomic weight-gradient path was compiled"
