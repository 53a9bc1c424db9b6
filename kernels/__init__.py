"""Fused Triton merge kernels, each beside its PyTorch reference (importable as ``dfsmerge.kernels``)."""
