"""Small assertions shared by test files (imported as `helpers`: pytest puts tests/ on sys.path)."""

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the parity measure the issues state their tolerances in."""
    return ((a - b).norm() / b.norm()).item()
