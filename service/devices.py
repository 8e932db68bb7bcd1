"""Where the served model runs: CUDA, then MPS, then the CPU, as the settings allow and the machine has."""

import torch


def select_device(use_cuda, use_mps):
    """Pick CUDA, then MPS, then CPU as allowed and available.

    Returns ``(device, reason, fell_back)``; ``fell_back`` is True when a device the settings ask
    for is not there, which deserves a warning.
    """
    if use_cuda:
        if torch.cuda.is_available():
            return torch.device("cuda"), "USE_CUDA is set and CUDA is available", False
        reason, fell_back = "USE_CUDA is set but CUDA is not available", True
    else:
        reason, fell_back = "USE_CUDA is not set", False
    if use_mps:
        if torch.backends.mps.is_available():
            return torch.device("mps"), f"{reason}; USE_MPS is set and MPS is available", False
        return torch.device("cpu"), f"{reason}; USE_MPS is set but MPS is not available", True
    return torch.device("cpu"), f"{reason}; USE_MPS is not set", fell_back
