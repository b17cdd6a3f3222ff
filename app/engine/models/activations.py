"""The activations a fused linear layer takes, by the names `base.linear` uses."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}

# The same activations as our CPU kernels' codes (kernels.h, `Activation`): fused into the GEMM there.
KERNEL_ACTIVATIONS: dict[str, int] = {"none": 0, "silu": 1, "gelu_tanh": 2, "gelu": 3}
