"""Benchmark stub (see torchvision/_stub.py)."""
from torchvision._stub import module_getattr

__version__ = "0.0+benchmark-stub"
__getattr__ = module_getattr(__name__)
