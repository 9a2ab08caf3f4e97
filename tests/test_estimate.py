"""`estimate`: the prediction against bytes counted and measured on real CPU steps, and its command line."""

from pathlib import Path

import pytest
import torch
import yaml

from bdh_lightning.estimate import (
    EstimateError,
    estimate_memory,
    largest_batch,
    measure_step,
    parse_bytes,
)
from bdh_lightning.main import main
from bdh_lightning.model import BDH, BDHConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(
    "B,T,D,H,mult,L,chunk", [(2, 32, 32, 2, 8, 2, 0), (4, 48, 32, 4, 16, 3, 0), (4, 64, 32, 2, 16, 2, 64)]
)
def test_prediction_matches_a_real_cpu_step(kernel, precision, B, T, D, H, mult, L, chunk):
    kwargs = dict(n_layer=L, n_embd=D, n_head=H, mlp_internal_dim_multiplier=mult, dropout=0.1, kernel=kernel, chunk_size=chunk)
    torch.manual_seed(0)
    model = BDH(BDHConfig(**kwargs))
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 256, (B, T + 1))
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    measure_step(model, optimizer, idx, autocast)  # the first step creates AdamW's state
    saved, peak = measure_step(model, optimizer, idx, autocast)
    predicted = estimate_memory(kwargs, B, T, precision, "cpu").kernels[kernel]
    assert abs(predicted.saved_bytes / saved - 1) < 0.15
    assert abs(predicted.peak_bytes / peak - 1) < 0.15


def test_chunked_saves_far_less_at_the_shipped_configs():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        report = estimate_memory(raw["model"], raw["data"]["batch_size"], raw["data"]["block_size"], "bf16-mixed")
        assert report.kernels["chunked"].saved_bytes * 4 <= report.kernels["reference"].saved_bytes, path.name


def test_static_bytes_and_largest_batch():
    kwargs = dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=96)
    report = estimate_memory(kwargs, 16, 384, "bf16-mixed")
    assert report.parameters == 19_005_440  # the spec's 14 GB example
    assert report.weight_bytes == report.grad_bytes == 4 * report.parameters
    assert report.optimizer_bytes == 8 * report.parameters
    budget = 14 * 10**9
    for kernel in ("reference", "chunked"):
        most = largest_batch(kwargs, 384, "bf16-mixed", "cuda", kernel, budget)
        assert estimate_memory(kwargs, most, 384, "bf16-mixed").kernels[kernel].peak_bytes <= budget
        assert estimate_memory(kwargs, most + 1, 384, "bf16-mixed").kernels[kernel].peak_bytes > budget


def test_parse_bytes():
    assert parse_bytes("14GB") == 14 * 10**9
    assert parse_bytes("14GiB") == 14 * 2**30
    assert parse_bytes("8e9") == 8 * 10**9
    for bad in ("14XB", "lots", "-1GB"):
        with pytest.raises(EstimateError):
            parse_bytes(bad)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_cli_prints_every_figure_for_the_shipped_configs(config, capsys):
    assert main(["estimate", "--config", str(REPO / "configs" / config), "--budget", "14GB"]) == 0
    out = capsys.readouterr().out
    for needle in ("parameters:", "weights:", "gradients:", "AdamW state:", "reference", "chunked", "largest batch"):
        assert needle in out


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    config = str(REPO / "configs" / "14gb.yaml")
    for args in (["--budget", "14XB"], ["--precision", "8-true"]):
        assert main(["estimate", "--config", config, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    assert main(["estimate", "--config", "no/such.yaml"]) == 2
