"""gist_fast: fused-kernel GIST / iDAT / two-stage PEFT for timm Vision Transformers."""
__version__ = "0.1.0"
