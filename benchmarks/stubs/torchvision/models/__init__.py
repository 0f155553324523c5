"""Benchmark stub (see torchvision/_stub.py)."""
from torchvision._stub import module_getattr

__getattr__ = module_getattr(__name__)
