"""trainer.precision: auto follows the hardware; an explicit precision wins, with a warning for emulated bf16."""
import pytest
import torch

from helpers import TINY_CLI_ARGS
from ssl_lightning.precision import resolve_precision

REPO_CONFIG = "experiments/fashion_mnist/vicreg.yaml"


def cpu_with(monkeypatch, avx512_bf16: bool, amx: bool, kernels: str = "AVX512") -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels if avx512_bf16 or amx else "AVX2")


def gpu_with(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100" if not bf16 else "NVIDIA H100")


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, True, "bf16-mixed"), (True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")])
def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    cpu_with(monkeypatch, avx512_bf16, amx)
    chosen, line = resolve_precision("auto", "cpu")
    assert chosen == expected
    assert line.startswith(f"precision auto: {expected} (this CPU has ")
    if expected == "32-true":
        assert "neither AVX512-BF16 nor AMX" in line and "7.6x slower" in line


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16, expected):
    gpu_with(monkeypatch, bf16)
    for accelerator in ("gpu", "cuda", "auto"):
        assert resolve_precision("auto", accelerator)[0] == expected


def test_kernels_limited_to_avx2_count_as_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on a CPU with AMX: the AVX2 kernels emulate bf16, as on an AVX2-only CPU."""
    cpu_with(monkeypatch, True, True, kernels="AVX2")
    chosen, line = resolve_precision("auto", "cpu")
    assert chosen == "32-true" and "kernels limited to AVX2" in line


def test_auto_accelerator_without_a_gpu_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cpu_with(monkeypatch, False, False)
    assert resolve_precision("auto", "auto")[0] == "32-true"
    assert resolve_precision("auto", "gpu")[0] == "32-true", "no GPU: Lightning, not us, says it is missing"


def test_an_explicit_precision_wins_and_emulated_bf16_is_warned_about(monkeypatch):
    cpu_with(monkeypatch, False, False)
    chosen, line = resolve_precision("bf16-mixed", "cpu")
    assert chosen == "bf16-mixed"
    assert line.startswith("warning: precision bf16-mixed on a CPU with neither AVX512-BF16 nor AMX")
    assert "--trainer.precision auto" in line
    assert resolve_precision("32-true", "cpu") == ("32-true", None)
    cpu_with(monkeypatch, True, True)
    assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", None), "native bf16: nothing to say"
    gpu_with(monkeypatch, True)
    assert resolve_precision("bf16-mixed", "gpu") == ("bf16-mixed", None), "the CPU's flags say nothing of a GPU"


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_the_cli_resolves_auto_before_the_trainer_is_built_and_says_so(monkeypatch, capsys, native, expected):
    from ssl_lightning.cli import SSLCLI

    cpu_with(monkeypatch, native, native)
    cli = SSLCLI(args=["--config", REPO_CONFIG, *TINY_CLI_ARGS, "--trainer.logger", "false"], run=False)
    assert cli.trainer.precision == expected
    assert f"precision auto: {expected}" in capsys.readouterr().err
