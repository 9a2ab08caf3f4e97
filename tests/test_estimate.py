"""`estimate`: the prediction against bytes counted and measured on real CPU steps, and its command line."""

from pathlib import Path

import pytest
import torch
import yaml
from measure import count_saved_bytes, measure_step

from bdh_lightning import estimate
from bdh_lightning.commands import parse_bytes
from bdh_lightning.console import format_bytes
from bdh_lightning.errors import ConfigError
from bdh_lightning.estimate import EstimateError, estimate_memory, largest_batch
from bdh_lightning.kernels.chunked import chunk_width
from bdh_lightning.main import main
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.precision import precision as lightning_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
@pytest.mark.parametrize(
    "B,T,D,H,mult,L,chunk",
    [(2, 32, 32, 2, 8, 2, 0), (4, 48, 32, 4, 16, 3, 0), (4, 64, 32, 2, 16, 2, 64), (1, 64, 32, 2, 16, 2, 0)],
)
def test_prediction_matches_a_real_cpu_step(kernel, precision, B, T, D, H, mult, L, chunk):
    """Autocast as Lightning runs it (no cast cache: each layer keeps its own weight casts); under 16-mixed the
    attention read and its T x T scores are float32; batch 1 keeps the weights' casts, not batch copies."""
    kwargs = dict(
        n_layer=L, n_embd=D, n_head=H, mlp_internal_dim_multiplier=mult, dropout=0.1, kernel=kernel, chunk_size=chunk
    )
    torch.manual_seed(0)
    model = BDH(BDHConfig(**kwargs)).to(torch.bfloat16 if precision == "bf16-true" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 256, (B, T + 1))
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    measure_step(model, optimizer, idx, autocast)  # the first step creates AdamW's state
    saved, peak = measure_step(model, optimizer, idx, autocast)
    predicted = estimate_memory(kwargs, B, T, precision, "cpu").kernels[kernel]
    assert abs(predicted.saved_bytes / saved - 1) < 0.15
    assert abs(predicted.peak_bytes / peak - 1) < 0.15


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_carried_state_is_counted_as_a_real_cpu_step_holds_it(kernel, precision):
    """model.carry_state: a window continuing its streams (the module's step) against the same window alone. The
    prediction's extra bytes (two states per layer during a step, the rows' own cos/sin, the reference's bfloat16
    copy) must match what the real step adds, and its peak the measured peak."""
    B, T, L = 4, 32, 2
    kwargs = dict(n_layer=L, n_embd=32, n_head=2, mlp_internal_dim_multiplier=32, dropout=0.1, kernel=kernel)
    autocast = {"bf16-mixed": torch.bfloat16}.get(precision)
    torch.manual_seed(0)
    model = BDH(BDHConfig(**kwargs))
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 256, (B, T + 1))
    measure_step(model, optimizer, idx, autocast)
    _, windowed = measure_step(model, optimizer, idx, autocast)
    c = model.config
    states = [torch.randn(B, c.n_head, c.neurons_per_head, c.n_embd) for _ in range(L)]
    _, carried = measure_step(model, optimizer, idx, autocast, states=states)
    assert states[0].shape == (B, c.n_head, c.neurons_per_head, c.n_embd)  # replaced by the written ones
    alone = estimate_memory(kwargs, B, T, precision, "cpu")
    report = estimate_memory({**kwargs, "carry_state": True}, B, T, precision, "cpu")
    assert report.state_bytes == B * L * c.n_head * c.neurons_per_head * c.n_embd * 4 == sum(t.nbytes for t in states)
    predicted_extra = report.kernels[kernel].peak_bytes - alone.kernels[kernel].peak_bytes
    assert predicted_extra >= 2 * report.state_bytes
    assert abs(predicted_extra / (carried - windowed) - 1) < 0.15
    assert abs(report.kernels[kernel].peak_bytes / carried - 1) < 0.15
    assert alone.state_bytes == 0


def test_the_command_shows_the_carried_state(tmp_path, capsys):
    config = tmp_path / "carried.yaml"
    config.write_text(
        "model:\n  n_layer: 2\n  n_embd: 64\n  n_head: 2\n  mlp_internal_dim_multiplier: 16\n  carry_state: true\n"
        "data:\n  batch_size: 8\n  block_size: 64\n  sampling: streams\n"
    )
    assert main(["estimate", "--config", str(config), "--device", "cpu", "--precision", "32-true"]) == 0
    out = capsys.readouterr().out
    # 8 rows x 2 layers x 2 heads x N 512 x D 64 x 4 bytes = 4 MiB.
    assert "carried state (model.carry_state): 4.00 MiB kept between steps, twice that during a step" in out


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
        assert estimate_memory(kwargs, most, 384, "bf16-mixed").kernels[kernel].device_bytes <= budget
        assert estimate_memory(kwargs, most + 1, 384, "bf16-mixed").kernels[kernel].device_bytes > budget


def test_cuda_needs_more_than_its_tensors():
    """On CUDA the device figure adds the allocator's slack, the context and cuBLAS workspaces (and NCCL's buffers
    with several ranks); DDP's gradient buckets are one more copy of the gradients, in the peak. The CPU: none."""
    kwargs = dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=96)
    one = estimate_memory(kwargs, 16, 384, "bf16-mixed", "cuda")
    two = estimate_memory(kwargs, 16, 384, "bf16-mixed", "cuda", world_size=2)
    cpu = estimate_memory(kwargs, 16, 384, "bf16-mixed", "cpu")
    for kernel in ("reference", "chunked"):
        peak = one.kernels[kernel].peak_bytes
        overhead = estimate.CUDA_CONTEXT_BYTES + estimate.CUBLAS_WORKSPACE_BYTES
        assert one.kernels[kernel].device_bytes == int(peak * (1 + estimate.ALLOCATOR_SLACK) + overhead)
        assert two.kernels[kernel].peak_bytes == peak + one.grad_bytes  # DDP's buckets
        assert two.kernels[kernel].device_bytes == estimate.device_bytes(peak + one.grad_bytes, "cuda", 2)
        assert (
            two.kernels[kernel].device_bytes - int((peak + one.grad_bytes) * 1.15 + overhead)
            == estimate.NCCL_BUFFER_BYTES
        )
        assert cpu.kernels[kernel].device_bytes == cpu.kernels[kernel].peak_bytes


def test_float16_counts_the_attention_read_in_float32():
    """The T x T scores of the read (and their gradients) are float32 under float16, bf16 under bfloat16: at a long
    block, where T x T dominates, 16-mixed needs clearly more than bf16-mixed."""
    kwargs = dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=4)
    bf16 = estimate_memory(kwargs, 2, 2048, "bf16-mixed", "cuda").kernels
    fp16 = estimate_memory(kwargs, 2, 2048, "16-mixed", "cuda").kernels
    scores = 2 * kwargs["n_layer"] * 2 * 2048 * 2048  # B * L * H * T * T
    assert fp16["chunked"].saved_bytes - bf16["chunked"].saved_bytes == scores * 2
    assert fp16["reference"].saved_bytes - bf16["reference"].saved_bytes > scores * 2


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
    for needle in ("parameters:", "weights:", "gradients:", "AdamW state:", "reference", "chunked", "largest batch",
                   "device needs", "CUDA context", "predicted, not measured"):  # fmt: skip
        assert needle in out


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    config = str(REPO / "configs" / "14gb.yaml")
    for args in (["--budget", "14XB"], ["--precision", "8-true"]):
        assert main(["estimate", "--config", config, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    assert main(["estimate", "--config", "no/such.yaml"]) == 2


def test_precision_16_is_estimated_as_lightnings_16_mixed(tmp_path, capsys):
    """`trainer.precision: 16` is Lightning's 16-mixed: float32 weights, gradients and AdamW moments (16 bytes a
    parameter) with float16 products. Read as 16-true the default model at batch 8, T 512 would be predicted 10% low
    (chunked: 1.60 GiB instead of 1.78), and fit's pre-flight check, which uses this estimate, would start runs that
    do not fit."""
    config = tmp_path / "sixteen.yaml"
    config.write_text("trainer:\n  precision: 16\ndata:\n  batch_size: 8\n  block_size: 512\n")
    assert main(["estimate", "--config", str(config), "--device", "cuda", "--budget", "80GB"]) == 0
    as_16 = capsys.readouterr().out
    assert "precision 16-mixed" in as_16.splitlines()[0]
    assert (
        main(["estimate", "--config", str(config), "--device", "cuda", "--budget", "80GB", "--precision", "16-mixed"])
        == 0
    )
    assert capsys.readouterr().out == as_16
    report = estimate_memory({}, 8, 512, 16, "cuda")
    mixed, true = estimate_memory({}, 8, 512, "16-mixed", "cuda"), estimate_memory({}, 8, 512, "16-true", "cuda")
    assert report == mixed and report.precision == "16-mixed"
    assert report.weight_bytes == report.grad_bytes == 4 * report.parameters
    assert report.optimizer_bytes == 8 * report.parameters
    assert f"{report.kernels['chunked'].peak_bytes / 2**30:.2f}" == "1.78"
    assert f"{true.kernels['chunked'].peak_bytes / 2**30:.2f}" == "1.60"


def test_largest_batch_at_its_edges_and_with_several_ranks():
    kwargs = dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16)

    def need(batch: int, world: int = 1) -> int:
        return estimate_memory(kwargs, batch, 128, "bf16-mixed", "cuda", world).kernels["chunked"].device_bytes

    def most(budget: int, world: int = 1) -> int:
        return largest_batch(kwargs, 128, "bf16-mixed", "cuda", "chunked", budget, world)

    assert most(need(1) - 1) == 0 and most(need(1)) == 1  # fitting exactly is fitting
    assert most(need(2) - 1) == 1 and most(need(5)) == 5 and most(need(6) - 1) == 5
    assert most(need(5, 2), world=2) == 5  # NCCL's buffers and DDP's buckets counted
    assert most(need(5), world=2) < 5


def expected_render(report, budget, model_kwargs) -> list[str]:
    """render's layout, line by line, from the report's own numbers."""
    b = format_bytes
    lines = [f"parameters: {report.parameters:,}",
             f"weights: {b(report.weight_bytes)}   gradients: {b(report.grad_bytes)}   AdamW state: {b(report.optimizer_bytes)}",
             f"batch {report.batch_size} x block {report.block_size}, precision {report.precision}, device {report.device_type}"]  # fmt: skip
    if report.state_bytes:
        lines.append(f"carried state (model.carry_state): {b(report.state_bytes)} kept between steps, twice that during "
                     "a step (the incoming and the written state), in every kernel's peak")  # fmt: skip
    lines.append(
        "kernel       saved for backward    transient   predicted peak   device needs" + ("   fits" if budget else "")
    )
    for kernel, m in report.kernels.items():
        row = f"{kernel:<10} {b(m.saved_bytes):>20} {b(m.transient_bytes):>12} {b(m.peak_bytes):>16} {b(m.device_bytes):>14}"
        if budget:
            fit = largest_batch(model_kwargs, report.block_size, report.precision, report.device_type, kernel, budget,
                                report.world_size)  # fmt: skip
            row += f"   {'yes' if m.device_bytes <= budget else 'no '} (largest batch that fits {b(budget)}: {fit})"
        lines.append(row)
    return lines


def test_render_word_for_word():
    """The table `estimate` prints: on CUDA with two ranks, a carried state and a budget (and the device line with
    NCCL's buffers and DDP's buckets); on the CPU without a budget (no fits column, no device line)."""
    carried = dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16, carry_state=True)
    report = estimate_memory(carried, 4, 128, "bf16-mixed", "cuda", world_size=2)
    device_line = ("device needs = predicted peak x 1.15 (allocator rounding and fragmentation) + 600.00 MiB CUDA context "
                   "+ 64.00 MiB cuBLAS workspaces")  # fmt: skip
    tail = [estimate.PREDICTION_NOTE, (
        "model.kernel auto on CUDA uses the reference where its predicted peak fits the GPU with a margin, else "
        "chunked; on the CPU the reference for small layers (B*H*T*N under 2**23) and chunked above; never fused "
        "(Triton, keeps chunked's bytes; its GPU speed is not measured).")]  # fmt: skip
    buckets = f"; DDP's gradient buckets ({format_bytes(report.bucket_bytes)}) are in the peak"
    expected = [
        *expected_render(report, 3 * 2**30, carried),
        device_line + " + 256.00 MiB NCCL buffers" + buckets,
        *tail,
    ]
    assert estimate.render(report, carried, 3 * 2**30).splitlines() == expected
    assert "yes (largest batch that fits 3.00 GiB: " in expected[5] and report.state_bytes == 2 * 2**20
    small = estimate_memory(carried, 4, 128, "32-true", "cuda")
    expected = [*expected_render(small, 2**25, carried), device_line, *tail]
    assert estimate.render(small, carried, 2**25).splitlines() == expected
    assert expected[5].endswith("   no  (largest batch that fits 32.00 MiB: 0)")
    plain = dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16)
    cpu = estimate_memory(plain, 4, 128, "32-true", "cpu")
    assert estimate.render(cpu, plain, None).splitlines() == [*expected_render(cpu, None, plain), *tail]


def test_parse_bytes_reads_every_unit_and_refuses_nothing_at_all():
    cases = {"7": 7, "512B": 512, "3b": 3, "2KB": 2000, "2kb": 2000, "3MB": 3 * 10**6, "1.5GB": 15 * 10**8,
             "5TB": 5 * 10**12, "2KiB": 2048, "3MiB": 3 * 2**20, "2GiB": 2**31, "1TiB": 2**40, " 8e9 ": 8 * 10**9}  # fmt: skip
    assert {text: parse_bytes(text) for text in cases} == cases
    for bad in ("0", "0GB", "-1", "14XB", "GB", ""):
        with pytest.raises(EstimateError) as error:
            parse_bytes(bad)
        assert str(error.value) == f"--budget {bad!r} is not a size; write it like 14GB, 14GiB or 8e9 (bytes)"


def test_the_carried_state_is_float32_or_float64_never_16_bits():
    cfg = BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)
    numbers = 3 * 2 * 2 * cfg.neurons_per_head * 32  # rows x layers x heads x N x D
    assert estimate.carried_state_bytes(cfg, 3, "64-true") == numbers * 8
    for precision in ("32-true", "bf16-mixed", "16-true"):
        assert estimate.carried_state_bytes(cfg, 3, precision) == numbers * 4


def test_one_rank_needs_no_nccl_buffers():
    overhead = estimate.CUDA_CONTEXT_BYTES + estimate.CUBLAS_WORKSPACE_BYTES
    assert estimate.device_bytes(10**9, "cuda") == int(10**9 * (1 + estimate.ALLOCATOR_SLACK) + overhead)
    assert estimate.device_bytes(10**9, "cpu", 2) == 10**9


def test_the_chunked_kernels_inventory_at_32_true():
    """What chunked keeps for backward, term by term (the inventory the measured tests hold within 15%): once per
    step the bytes and targets, the embedding, its layer norm's stats, cos/sin, lm_head's input and the float32
    log-softmax; per layer x, the scores, y and its rstd, and the tail's two layer norms."""
    cfg = BDHConfig(n_layer=3, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8)
    B, T, D, H, N, V, L = 2, 24, 32, cfg.n_head, cfg.neurons_per_head, cfg.vocab_size, 3
    head = 16 * B * T + B * T * D * 4 + 2 * B * T * 4 + 2 * T * N * 4 + B * T * D * 4 + B * T * V * 4
    layer = B * T * D * 4 + B * H * T * T * 4 + B * H * T * D * 4 + B * H * T * 4
    tail = B * T * D * 8 + 2 * B * T * 8
    assert estimate.saved_bytes("chunked", cfg, B, T, "32-true", "cpu") == head + L * (layer + tail)


def test_choose_kernel_word_for_word(monkeypatch):
    """What `model.kernel` stands for: a set kernel as set (resolved for the device), auto on the CPU by the measured
    B x H x T x N rule (at 2**23 exactly: chunked), auto on CUDA by the predicted peak against the device's memory
    with the margins (the device asked when no size is given), and a reason for the run's header."""
    from bdh_lightning.estimate import choose_kernel

    tiny = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)  # N = 128
    chunked = BDHConfig(**tiny, kernel="chunked")
    assert choose_kernel(chunked, 4, 64, "32-true", "cpu") == ("chunked", "kernel chunked: set by model.kernel")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):  # fused, resolved for the CPU
        choose_kernel(BDHConfig(**tiny, kernel="fused"), 4, 64, "32-true", "cpu")
    assert choose_kernel(BDHConfig(**tiny, kernel="fused"), 4, 64, "32-true", "cuda")[0] == "fused"
    auto = BDHConfig(**tiny, kernel="auto")
    rule = "elements per B x H x T x N tensor (this run: {}), measured faster"
    assert choose_kernel(auto, 4, 64, "32-true", "cpu") == (
        "reference", "kernel reference: on the CPU, below 2**23 " + rule.format("65,536"))  # fmt: skip
    assert choose_kernel(auto, 511, 64, "32-true", "cpu")[0] == "reference"  # 2**23 - 2**14
    assert choose_kernel(auto, 512, 64, "32-true", "cpu") == (
        "chunked", "kernel chunked: on the CPU, from 2**23 " + rule.format("8,388,608"))  # fmt: skip
    peaks = {
        k: m.peak_bytes
        for k, m in estimate_memory({**tiny, "kernel": "auto"}, 4, 64, "bf16-mixed", "cuda").kernels.items()
    }
    need = {k: int(peak * 1.15) + 2**30 for k, peak in peaks.items()}  # the margins: 15% and 1 GiB
    b = format_bytes
    asked = []
    monkeypatch.setattr(estimate, "device_memory", lambda device: (asked.append(device) or need["reference"] + 1, "-"))
    assert choose_kernel(auto, 4, 64, "bf16-mixed", "cuda:1") == (
        "reference", f"kernel reference: it needs {b(peaks['reference'])} (predicted), the GPU has {b(need['reference'] + 1)}")  # fmt: skip
    assert asked == [torch.device("cuda", 1)]
    assert choose_kernel(auto, 4, 64, "bf16-mixed", "cuda", need["reference"] - 2)[0] == "chunked"
    assert estimate.fits_device(0, 2**30) and not estimate.fits_device(1, 2**30)  # fitting exactly is fitting
    too_small = need["chunked"] - 2
    assert choose_kernel(auto, 4, 64, "bf16-mixed", "cuda", too_small) == (
        "chunked", f"kernel chunked: reference needs {b(peaks['reference'])}, the GPU has {b(too_small)}; chunked needs "
        f"{b(peaks['chunked'])} and may not fit either: lower data.batch_size")  # fmt: skip


def test_choose_kernel_asks_torch_only_when_nvml_cannot_say(monkeypatch):
    """Catches torch's CUDA context made where NVML answered, NVML's silence not answered by torch, the device
    lost on the way, and a machine without a GPU not taken as no memory (Lightning then refuses the run itself)."""
    from types import SimpleNamespace

    from bdh_lightning import estimate

    auto = BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, kernel="auto")
    asked = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: asked.append(device) or SimpleNamespace(total_memory=64 * 2**30))  # fmt: skip
    monkeypatch.setattr(estimate, "device_memory", lambda device: (2**30, "the GPU has"))
    assert "the GPU has 1.00 GiB" in estimate.choose_kernel(auto, 4, 64, "bf16-mixed", "cuda:1")[1] and asked == []
    monkeypatch.setattr(estimate, "device_memory", lambda device: (None, ""))
    assert "the GPU has 64.00 GiB" in estimate.choose_kernel(auto, 4, 64, "bf16-mixed", "cuda:1")[1]
    assert asked == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "the GPU has 0 B" in estimate.choose_kernel(auto, 4, 64, "bf16-mixed", "cuda:1")[1]
    assert len(asked) == 1


def test_layer_norms_of_16_bit_inputs_keep_float32_on_cuda():
    """Under autocast on CUDA layer norm keeps its low-precision input as float32 (on the CPU in its own dtype): the
    tail's two layer norms per layer cost 2 bytes more per element and per mean/rstd there."""
    cfg = BDHConfig(n_layer=3, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8)
    B, T, D, L = 2, 24, 32, 3
    cuda = estimate.saved_bytes("chunked", cfg, B, T, "bf16-mixed", "cuda")
    cpu = estimate.saved_bytes("chunked", cfg, B, T, "bf16-mixed", "cpu")
    assert cuda - cpu == L * (B * T * D * 2 + 2 * B * T * 2)


def test_largest_batch_doubles_then_halves_to_an_exact_integer():
    kwargs = dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16)

    def need(batch: int) -> int:
        return estimate_memory(kwargs, batch, 128, "bf16-mixed", "cuda").kernels["chunked"].device_bytes

    for batch in (2, 3, 4, 5, 7, 8):
        most = largest_batch(kwargs, 128, "bf16-mixed", "cuda", "chunked", need(batch))
        assert most == batch and type(most) is int
    report = estimate_memory(kwargs, 4, 128, "bf16-mixed", "cuda")
    exactly = report.kernels["chunked"].device_bytes
    row = estimate.render(report, kwargs, exactly).splitlines()[-4]
    assert row.startswith("chunked ") and "   yes (largest batch that fits" in row  # fitting exactly is fitting


# The inventory pinned exactly: the prediction against the bytes autograd actually keeps for a tiny CPU forward,
# for every precision, both kernels, dropout on and off, several shapes, and a carried state.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
WEIGHTS_DTYPE = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}  # else float32
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def tiny_model(kwargs: dict, precision: str) -> BDH:
    torch.manual_seed(0)
    return BDH(BDHConfig.from_dict(kwargs)).to(WEIGHTS_DTYPE.get(precision, torch.float32))


def saved_by_autograd(kwargs: dict, B: int, T: int, precision: str, carried: bool = False) -> int:
    """Bytes autograd keeps for one training forward of a BDH on the CPU at `precision` (autocast as Lightning
    runs it: no cast cache), counted with saved-tensor hooks; inputs and targets are two int64 B x T tensors.
    `carried`: the window continues streams, each row at its own position (model.carry_state); the incoming
    states are left out, as estimate_memory counts them with the kept state."""
    model = tiny_model(kwargs, precision)
    c = model.config
    x, y = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    wide = torch.float64 if precision == "64-true" else torch.float32
    shape = (B, c.n_head, c.neurons_per_head, c.n_embd)
    states = [torch.randn(shape, dtype=wide) for _ in range(c.n_layer)] if carried else []
    autocast = AUTOCAST.get(precision)

    def forward():
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None, cache_enabled=False):
            logits = model.forward_stream(x, torch.arange(1, B + 1) * T, states)[0] if carried else model(x)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    assert model.training  # dropout applies
    return count_saved_bytes(forward, leave_out=[*states, *model.parameters()])  # weights' views too (B = 1)


def unmodelled_scalars(kernel: str, n_layer: int) -> int:
    """What autograd keeps that the estimate leaves out: the loss's float32 scalar (cross-entropy's total weight)
    and, in chunked, each layer's int64 dropout seed."""
    return 4 + (8 * n_layer if kernel == "chunked" else 0)


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("B,T,D,H,mult,L", [(2, 12, 16, 2, 4, 2), (3, 8, 24, 4, 8, 1), (1, 12, 16, 2, 4, 2)])
def test_saved_bytes_are_the_bytes_autograd_keeps_on_the_cpu(kernel, precision, dropout, B, T, D, H, mult, L):
    """Every term of saved_bytes: a wrong factor, dtype or condition changes the total in some case."""
    kwargs = dict(n_layer=L, n_embd=D, n_head=H, mlp_internal_dim_multiplier=mult, dropout=dropout, kernel=kernel)
    predicted = estimate.saved_bytes(kernel, BDHConfig(**kwargs), B, T, precision, "cpu")
    assert predicted + unmodelled_scalars(kernel, L) == saved_by_autograd(kwargs, B, T, precision)


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_carried_window_keeps_what_the_estimate_adds(kernel, precision):
    """model.carry_state: per-row cos/sin (each row continues its stream at its own position) and, in the reference
    under bfloat16, the read's bfloat16 copy of the incoming state (float16 reads in float32: no copy)."""
    kwargs = dict(n_layer=2, n_embd=24, n_head=4, mlp_internal_dim_multiplier=8, kernel=kernel, carry_state=True)
    report = estimate_memory(kwargs, 3, 8, precision, "cpu")
    predicted = report.kernels[kernel].saved_bytes + unmodelled_scalars(kernel, 2)
    assert predicted == saved_by_autograd(kwargs, 3, 8, precision, carried=True)


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cuda_keeps_float32_layer_norm_inputs_and_a_bool_dropout_mask(kernel, precision, dropout):
    """What a CUDA step keeps beyond the CPU's inventory (pinned above): under autocast layer norm saves its
    16-bit input and mean/rstd as float32 (the tail's two per layer; in the reference also the read's under
    bfloat16, as float16's read is float32 already); the reference's dropout mask is bool, not float noise."""
    cfg = BDHConfig(n_layer=3, n_embd=24, n_head=4, mlp_internal_dim_multiplier=8, dropout=dropout)
    B, T, D, H, N, L = 2, 10, 24, 4, cfg.neurons_per_head, 3
    e = {"64-true": 8, "32-true": 4}.get(precision, 2)
    extra = L * (B * T * D + 2 * B * T) * (4 - e) if precision in AUTOCAST else 0
    if kernel == "reference" and precision == "bf16-mixed":
        extra += L * (B * H * T * D + 2 * B * H * T) * (4 - e)
    if kernel == "reference" and dropout:
        extra += L * B * H * T * N * (1 - e)
    cuda = estimate.saved_bytes(kernel, cfg, B, T, precision, "cuda")
    assert cuda - estimate.saved_bytes(kernel, cfg, B, T, precision, "cpu") == extra


@pytest.mark.parametrize("precision", PRECISIONS)
# Larger than the loss: both kernels' gradients (2, 16); the reference's loss, chunked's working set (4, 24);
# both kernels' loss (32, 8); chunk sizes automatic (a whole head, and half of one past 2**26 elements), odd
# (rounded down to even) and 2.
@pytest.mark.parametrize("B,T,chunk", [(2, 16, 0), (4, 24, 0), (32, 8, 2), (4, 24, 7), (2048, 512, 0)])
def test_transient_bytes_term_by_term(precision, B, T, chunk):
    """The largest working set: the loss's float32 gradients (log_softmax's and the logits', and the logits'
    16-bit gradient under autocast), or the gradients (in the weights' dtype) plus the working set of one
    layer's backward. The reference frees its saved N-wide tensors as it makes their gradients; chunked holds
    11 B x T x chunk tensors of the activations' dtype and one float32 per chunk, 3 T x T score gradients (in
    the read's dtype), the N-wide weights' low-precision copies under autocast, and their float32 gradient
    accumulators under 16-true and bf16-true."""
    model = tiny_model(dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8), precision)
    cfg, grads = model.config, sum(t.nbytes for t in model.parameters())
    D, H, N, V = 32, 2, cfg.neurons_per_head, 256
    e = {"64-true": 8, "32-true": 4}.get(precision, 2)
    loss = B * T * V * (8 + (e if precision in AUTOCAST else 0))
    assert estimate.transient_bytes("reference", cfg, B, T, precision, chunk) == max(loss, grads)
    width = chunk_width(chunk, B * T, N)
    read = 4 if precision in ("16-mixed", "16-true") else e
    n_wide_weights = 3 * H * D * N
    working = B * T * width * (11 * e + 8) + 3 * B * T * T * read
    working += n_wide_weights * e if precision in AUTOCAST else 0
    working += n_wide_weights * 4 if precision in ("bf16-true", "16-true") else 0
    assert estimate.transient_bytes("chunked", cfg, B, T, precision, chunk) == max(loss, grads + working)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_estimate_memory_adds_up_the_real_tensors(precision, carry, world, device_type):
    """Weights and gradients as the model's parameters at `precision`, AdamW's two moments as a real step makes
    them, DDP's buckets a copy of the gradients on several ranks, the carried state as the window writes it (two
    states per layer during a step: the incoming and the written), saved and transient bytes with the
    model's chunk size; the peak is their sum, and the device needs device_bytes of it."""
    kwargs = dict(n_layer=2, n_embd=24, n_head=4, mlp_internal_dim_multiplier=8, chunk_size=6, carry_state=carry)
    B, T = 3, 8
    model = tiny_model(kwargs, precision)
    cfg, x = model.config, torch.randint(0, 256, (B, T))
    adamw = torch.optim.AdamW(model.parameters())
    model(x).float().sum().backward()
    adamw.step()
    weights = sum(t.nbytes for t in model.parameters())
    moments = sum(s[k].nbytes for s in adamw.state.values() for k in ("exp_avg", "exp_avg_sq"))
    state = sum(t.nbytes for t in model.forward_stream(x, torch.zeros(B, dtype=torch.long))[1]) if carry else 0
    report = estimate_memory(kwargs, B, T, precision, device_type, world)
    assert report.parameters == sum(t.numel() for t in model.parameters())
    assert (report.weight_bytes, report.grad_bytes, report.optimizer_bytes) == (weights, weights, moments)
    assert (report.bucket_bytes, report.state_bytes) == ((weights if world > 1 else 0), state)
    assert (report.batch_size, report.block_size, report.precision) == (B, T, precision)
    assert (report.device_type, report.world_size) == (device_type, world)
    static = weights + moments + report.bucket_bytes + 2 * state
    for kernel in ("reference", "chunked"):
        saved = estimate.saved_bytes(kernel, cfg, B, T, precision, device_type)
        if carry:  # per-row cos/sin; the reference's bfloat16 copy of the incoming state (test above)
            saved += 2 * (B - 1) * T * cfg.neurons_per_head * 4
            saved += state // 2 if kernel == "reference" and precision.startswith("bf16") else 0
        m = report.kernels[kernel]
        assert m.saved_bytes == saved
        assert m.transient_bytes == estimate.transient_bytes(kernel, cfg, B, T, precision, 6)
        assert m.peak_bytes == static + saved + m.transient_bytes and type(m.peak_bytes) is int
        assert m.device_bytes == estimate.device_bytes(m.peak_bytes, device_type, world)
    assert list(report.kernels) == ["reference", "chunked"]


def test_estimate_memory_defaults_to_32_true_on_one_cuda_device():
    kwargs = dict(n_layer=2, n_embd=24, n_head=4, mlp_internal_dim_multiplier=8)
    assert estimate_memory(kwargs, 3, 8) == estimate_memory(kwargs, 3, 8, "32-true", "cuda", 1)


def test_an_unknown_precision_is_refused_in_the_precision_modules_words():
    with pytest.raises(ConfigError) as expected:
        lightning_precision("8-true")
    with pytest.raises(EstimateError) as error:
        estimate_memory({}, 1, 8, "8-true")
    assert str(error.value) == str(expected.value) and error.value.__cause__ is None
