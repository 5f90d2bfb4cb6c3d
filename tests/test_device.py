"""Device choice: argument > $V4LAB_DEVICE > CUDA if present > CPU; the Triton mode follows it."""
import pytest
import torch

from v4lab import device, hardware


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("V4LAB_DEVICE", raising=False)
    return monkeypatch


def _fake_cuda(monkeypatch, n=1, name="NVIDIA H200"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)


def test_precedence(no_env):
    assert device.get_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    no_env.setenv("V4LAB_DEVICE", "cpu")
    assert device.get_device() == torch.device("cpu")
    _fake_cuda(no_env)
    assert device.get_device() == torch.device("cpu")               # env beats "CUDA present"
    assert device.get_device("cuda") == torch.device("cuda")        # argument beats env
    assert device.get_device(torch.device("cuda", 0)) == torch.device("cuda:0")
    no_env.setenv("V4LAB_DEVICE", " AUTO ")
    assert device.get_device() == torch.device("cuda")              # auto: CUDA when present


def test_auto_without_cuda(no_env):
    no_env.setattr(torch.cuda, "is_available", lambda: False)
    assert device.get_device() == torch.device("cpu")
    assert device.get_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("value, words", [("tpu", "not a torch device"), ("mps", "cpu or cuda"),
                                          ("cuda:3", "cuda:0..cuda:0"), (3, "must be a string")])
def test_bad_values(no_env, value, words):
    _fake_cuda(no_env, n=1)
    with pytest.raises(ValueError, match=words):
        device.get_device(value)


def test_bad_env_names_the_variable(no_env):
    no_env.setenv("V4LAB_DEVICE", "gpu0")
    with pytest.raises(ValueError, match=r"\$V4LAB_DEVICE = 'gpu0'"):
        device.get_device()


def test_cuda_requested_without_cuda(no_env):
    no_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        device.get_device("cuda")


def test_kernel_mode_follows_choice(no_env):
    no_env.delenv("TRITON_INTERPRET", raising=False)
    no_env.setattr(torch.cuda, "is_available", lambda: False)
    assert device.kernel_mode() == "interpreter"                   # predicted before v4lab.kernels is imported
    _fake_cuda(no_env)
    assert device.kernel_mode() == "compiled"
    no_env.setenv("V4LAB_DEVICE", "cpu")
    assert device.kernel_mode() == "interpreter"                   # CPU chosen on a GPU box
    assert device.configure_triton() == "interpreter"
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    no_env.setenv("TRITON_INTERPRET", "0")                          # an explicit setting wins
    assert device.kernel_mode() == "compiled"


def test_check_kernel_device(no_env):
    no_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="compiled for CUDA"):
        device.check_kernel_device("cpu")
    no_env.setenv("TRITON_INTERPRET", "1")
    assert device.check_kernel_device("cpu") == torch.device("cpu")
    _fake_cuda(no_env)
    with pytest.raises(ValueError, match="interpret"):
        device.check_kernel_device("cuda")


def test_describe_cpu(no_env):
    no_env.setattr(torch.cuda, "is_available", lambda: False)
    no_env.setenv("TRITON_INTERPRET", "1")
    line = device.describe()
    assert "\n" not in line and "device cpu" in line and "auto: no CUDA" in line
    assert "interpreted" in line and "not performance" in line
    assert "chosen by argument" in device.describe("cpu")


def test_describe_gpu(no_env):
    _fake_cuda(no_env, name="NVIDIA H200")
    no_env.setenv("TRITON_INTERPRET", "0")
    info = device.device_info()
    assert info["gpu_key"] == "H200" and info["kernel_mode"] == "compiled"
    line = device.describe()
    assert "NVIDIA H200" in line and "compiled" in line and "no roofline" not in line
    no_env.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert "no roofline" in device.describe()


def test_identify_gpu():
    assert hardware.identify_gpu("NVIDIA H200") == "H200"
    assert hardware.identify_gpu("NVIDIA B200") == "B200"
    assert hardware.identify_gpu("NVIDIA H100 80GB HBM3") == "H100"
    assert hardware.identify_gpu("NVIDIA H100 PCIe") is None          # slower part: not given SXM peaks
    assert hardware.identify_gpu("NVIDIA A100-SXM4-80GB") == "A100"
    assert hardware.identify_gpu("NVIDIA A100-PCIE-40GB") is None          # other A100 parts: other figures
    assert hardware.identify_gpu(None) is None
    h200 = hardware.gpu("H200")
    assert h200["hbm_tb_s"] == pytest.approx(4.8) and h200["tflops"]["bf16"] == pytest.approx(989, rel=0.01)
    assert h200["tflops"]["fp8"] == pytest.approx(1979, rel=0.01)
