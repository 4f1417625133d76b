"""End-to-end training-step benchmark: a thin wrapper over `gist-fast bench` (gist_fast/bench.py).

    python benchmarks/bench_e2e.py --models vit_tiny --batches 8,32            # CPU
    python benchmarks/bench_e2e.py --models vit_tiny,vit_small,vit_base --dtype bf16   # CUDA
"""
import sys

from gist_fast.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
