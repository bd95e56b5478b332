"""Recursive comparison of states and payloads (dicts, lists, tensors) for the tests; names the first difference."""
import torch


def deep_equal(a, b, where="state", atol=1e-6, rtol=1e-5):
    """Tensors allclose (``atol``, ``rtol``), containers element by element, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.allclose(a.float().cpu(), b.float().cpu(), atol=atol, rtol=rtol), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            deep_equal(a[k], b[k], f"{where}.{k}", atol, rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            deep_equal(x, y, f"{where}[{i}]", atol, rtol)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
