"""Backend choice: argument > COMPRESSOR_KERNELS > auto, lazy Triton import, KernelUnavailable."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import compressor.kernels.dispatch as kernels
import pytest
import torch
from compressor.kernels.dispatch import KernelUnavailable, available_backends, resolve_backend

CPU = torch.zeros(2)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("COMPRESSOR_KERNELS", raising=False)


@pytest.fixture
def triton_missing(monkeypatch):
    """Make `import triton` fail as if the package were not installed."""
    monkeypatch.setitem(sys.modules, "triton", None)


def test_auto_on_cpu_tensors_is_the_reference(no_env):
    assert resolve_backend(None, CPU) == "ref"
    assert resolve_backend("auto", CPU) == "ref"


def test_environment_variable_is_used_when_no_argument(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
    pytest.importorskip("triton")
    assert resolve_backend(None, CPU) == "triton"


def test_argument_wins_over_environment_variable(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
    assert resolve_backend("ref", CPU) == "ref"
    monkeypatch.setenv("COMPRESSOR_KERNELS", "ref")
    pytest.importorskip("triton")
    assert resolve_backend("triton", CPU) == "triton"


def test_unknown_backend_names_are_rejected(monkeypatch, no_env):
    with pytest.raises(
        ValueError, match=r"`backend` must be one of \['ref', 'triton', 'auto'\], got 'cuda'"
    ):
        resolve_backend("cuda", CPU)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "fast")
    with pytest.raises(ValueError, match="COMPRESSOR_KERNELS must be one of"):
        resolve_backend(None, CPU)


def test_missing_triton_raises_kernel_unavailable_with_the_install_command(triton_missing, no_env):
    assert available_backends() == ["ref"]
    with pytest.raises(KernelUnavailable, match=r"pip install 'compressor\[kernels\]'"):
        resolve_backend("triton", CPU)
    with pytest.raises(KernelUnavailable, match="`backend` asks for the Triton backend"):
        kernels.mezo_axpy_(torch.zeros(4), 0, 0, 1.0, backend="triton")
    assert resolve_backend(None, CPU) == "ref"  # auto never needs Triton


def test_missing_triton_named_by_environment_variable(triton_missing, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
    with pytest.raises(KernelUnavailable, match="COMPRESSOR_KERNELS asks for the Triton backend"):
        resolve_backend(None, CPU)


def test_kernel_unavailable_is_a_runtime_error():
    assert issubclass(KernelUnavailable, RuntimeError)


def test_autograd_inputs_use_the_reference(no_env):
    weight = torch.zeros(3, 2, requires_grad=True)
    assert resolve_backend(None, CPU, weight) == "ref"
    pytest.importorskip("triton")
    with pytest.raises(KernelUnavailable, match="forward-only"):
        resolve_backend("triton", CPU, weight)
    with torch.no_grad():
        assert resolve_backend("triton", CPU, weight) == "triton"


def test_interpreter_makes_triton_available_on_cpu():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks the CPU interpreter setup")
    assert available_backends() == ["ref", "triton"]


@pytest.mark.gpu
def test_auto_on_cuda_tensors_is_triton(no_env):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert resolve_backend(None, CPU.cuda()) == "triton"


def test_import_works_without_triton_and_does_not_load_it():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import compressor.kernels.dispatch as k, torch\n"
        "assert k.available_backends() == ['ref']\n"
        "x = torch.ones(1, 4)\n"
        "print(k.low_rank_linear(x, torch.ones(2, 1), torch.ones(1, 4)).tolist())\n"
        "assert 'compressor.kernels.triton' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[4.0, 4.0]]"


@pytest.fixture
def env_triton(monkeypatch):
    """COMPRESSOR_KERNELS=triton, with the one-time autograd warning not yet given."""
    pytest.importorskip("triton")
    monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
    monkeypatch.setattr(kernels, "_warned_env_autograd", False, raising=False)


def _low_rank_with_grad(backend=None):
    """low_rank_linear output and the gradient of its sum w.r.t. a trainable u."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, generator=gen)
    v = torch.randn(2, 5, generator=gen)
    u = torch.randn(4, 2, generator=gen).requires_grad_()
    y = kernels.low_rank_linear(x, u, v, backend=backend)
    y.sum().backward()
    return y.detach(), u.grad


def test_env_triton_with_autograd_falls_back_to_the_reference_and_warns_once(env_triton):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so a second warning would be recorded, not suppressed
        y, grad = _low_rank_with_grad()
        _low_rank_with_grad()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "COMPRESSOR_KERNELS=triton" in messages[0]
    assert "forward-only" in messages[0] and "reference is used" in messages[0]
    y_ref, grad_ref = _low_rank_with_grad(backend="ref")
    assert grad is not None
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    # d(sum y)/du = sum over rows of (x @ v.T): check against the maths, not only the reference.
    gen = torch.Generator().manual_seed(7)
    x, v = torch.randn(3, 5, generator=gen), torch.randn(2, 5, generator=gen)
    torch.testing.assert_close(grad, (x @ v.T).sum(0).expand(4, 2))


def test_env_triton_falls_back_only_while_grad_is_recorded(env_triton):
    weight = torch.zeros(3, 2, requires_grad=True)
    with pytest.warns(UserWarning, match="forward-only"):
        assert resolve_backend(None, CPU, weight) == "ref"
    with torch.no_grad():
        assert resolve_backend(None, CPU, weight) == "triton"
    assert resolve_backend(None, CPU) == "triton"


def test_explicit_triton_with_autograd_still_raises_under_env_triton(env_triton):
    with pytest.raises(
        KernelUnavailable, match="`backend` asks for the Triton backend.*forward-only"
    ):
        _low_rank_with_grad(backend="triton")
