"""Triton kernels and their launchers, one file per op (installed as gist_fast.kernels)."""
