"""CPU stand-in for `torchvision`, imported by SGLang's multimodal configs (see `_cpu_stand_in`)."""

from _cpu_stand_in import make_stand_in

__version__ = "0.0.0+cpu-stand-in"
make_stand_in(globals())
