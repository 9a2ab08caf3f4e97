"""Generation: the recurrent form against the parallel forward, sampling, checkpoints, the `generate` command."""

import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL
from measure import full_prefix_generate

from bdh_lightning.cli import BDHCLI
from bdh_lightning.commands import shown
from bdh_lightning.errors import ConfigError
from bdh_lightning.generate import (
    Generator,
    generate_text,
    sample_bytes,
    sample_next,
)
from bdh_lightning.main import main as cli_main
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.module import BDHLitModule
from bdh_lightning.weights import load_model_from_checkpoint

TINY = TINY_MODEL


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead per byte (and a lot on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(seed=0, std=0.02, **sizes) -> BDH:
    torch.manual_seed(seed)
    model = BDH(BDHConfig(**{**TINY, "dropout": 0.0, **sizes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def assert_logits_close(actual, expected):
    """Equal to 1e-4 relative at every position: |diff| <= 1e-4 * max |logit| of that position."""
    scale = expected.abs().amax(dim=-1, keepdim=True)
    worst = ((actual - expected).abs() / scale).max().item()
    assert worst <= 1e-4, f"recurrent logits differ from the parallel forward by {worst:.2e} relative"


@pytest.mark.parametrize(
    "sizes, std",
    [
        (dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8), 0.02),
        (dict(n_layer=3, n_embd=64, n_head=4, mlp_internal_dim_multiplier=4), 0.02),
        (dict(n_layer=1, n_embd=48, n_head=1, mlp_internal_dim_multiplier=4), 0.05),  # larger scores
    ],
)
def test_recurrent_steps_equal_parallel_forward_at_every_position(sizes, std):
    model = random_model(seed=1, std=std, **sizes)
    idx = torch.randint(0, 256, (1, 2000), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(idx)
        generator = Generator(model)
        actual = torch.stack([generator.step(idx[:, t]) for t in range(idx.shape[1])], dim=1)
    assert generator.position == 2000
    assert_logits_close(actual, expected)


def test_chunked_prompt_reading_equals_one_shot_and_steps():
    model = random_model(seed=3)
    idx = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model(idx)
        one_shot = Generator(model, batch_size=2)
        assert_logits_close(one_shot.forward_chunk(idx), expected)
        for chunk_size in (1, 7, 64, 299):
            chunked = Generator(model, batch_size=2)
            pieces = [chunked.forward_chunk(idx[:, s : s + chunk_size]) for s in range(0, 300, chunk_size)]
            assert_logits_close(torch.cat(pieces, dim=1), expected)
            for got, want in zip(chunked.states, one_shot.states):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            prefilled = Generator(model, batch_size=2)
            assert_logits_close(prefilled.prefill(idx, chunk_size), expected[:, -1])
        # Reading on after a chunked prompt continues at the right absolute positions.
        assert_logits_close(chunked.step(idx[:, 0]), model(torch.cat((idx, idx[:, :1]), dim=1))[:, -1])


def test_generated_bytes_are_what_full_prefix_recomputation_gives():
    model = random_model(seed=5)
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(6))
    recurrent = torch.stack(list(Generator(model).generate(prompt, 40, temperature=0.0)), dim=1)
    full_prefix = full_prefix_generate(model, prompt, 40)
    assert torch.equal(full_prefix[:, :20], prompt)
    assert torch.equal(recurrent, full_prefix[:, 20:])


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(7))
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature=0.0), argmax)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, temperature=1.5, top_k=1, generator=gen), argmax)
        assert torch.equal(sample_next(logits, temperature=1.5, top_p=1e-6, generator=gen), argmax)


def test_top_k_and_top_p_restrict_the_choice():
    torch.manual_seed(8)
    logits = torch.randn(1, 256).repeat(2000, 1)
    gen = torch.Generator().manual_seed(9)
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = set(sample_next(logits, top_k=3, generator=gen).tolist())
    assert drawn == top3  # only those, and (2000 draws) all of them
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) < 0.5).sum()) + 1  # smallest prefix with mass >= 0.5
    drawn = set(sample_next(logits, top_p=0.5, generator=gen).tolist())
    assert drawn == set(order[:nucleus_size].tolist())


def test_sampling_with_a_seed_is_reproducible():
    model = random_model(seed=10)
    first = generate_text(model, b"To be or ", 60, num_samples=3, temperature=1.0, top_k=50, seed=11)
    again = generate_text(model, b"To be or ", 60, num_samples=3, temperature=1.0, top_k=50, seed=11)
    other = generate_text(model, b"To be or ", 60, num_samples=3, temperature=1.0, top_k=50, seed=12)
    assert first == again and first != other
    assert len(first) == 3 and all(len(sample) == 60 for sample in first)


def save_lightning_checkpoint(tmp_path: Path) -> tuple[Path, BDHLitModule]:
    """A real checkpoint: a few training steps of a tiny BDHLitModule with a plain Lightning Trainer."""
    L.seed_everything(0)
    module = BDHLitModule(**TINY)
    data = torch.randint(0, 256, (32, 17))
    loader = torch.utils.data.DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=8)
    trainer = L.Trainer(
        max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, BDHLitModule]:
    """One real checkpoint that this file's tests read (never write): trained once, not once per test."""
    return save_lightning_checkpoint(tmp_path_factory.mktemp("trained"))


def test_load_model_from_lightning_checkpoint(trained, tmp_path):
    path, module = trained
    model = load_model_from_checkpoint(path, "cpu")
    assert not model.training
    for name, value in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    idx = torch.randint(0, 256, (1, 50))
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), module.model.eval()(idx))


def test_generate_command_streams_the_prompt_and_continuation(trained, tmp_path, capsys):
    path, module = trained
    args = [
        "--ckpt_path",
        str(path),
        "--prompt",
        "To be or ",
        "--max_new_tokens",
        "80",
        "--temperature",
        "1.0",
        "--seed",
        "1",
    ]
    assert cli_main(["generate", *args]) == 0
    out = capsys.readouterr().out
    # Random-ish weights give bytes >= 128 that are not valid UTF-8: they must show, not crash.
    (new,) = generate_text(load_model_from_checkpoint(path), b"To be or ", 80, temperature=1.0, seed=1)
    # Control bytes other than newline and tab are shown escaped (a model's output could drive the terminal).
    assert out == shown((b"To be or " + new).decode("utf-8", errors="backslashreplace")) + "\n"
    assert cli_main(["generate", *args]) == 0 and capsys.readouterr().out == out  # same seed, same text


def test_generate_command_batch_greedy_and_prompt_file(trained, tmp_path, capsys):
    path, _ = trained
    prompt_file = tmp_path / "prompt.bin"
    prompt_file.write_bytes(b"\xffabc")  # not valid UTF-8 itself
    args = ["--ckpt_path", str(path), "--prompt_file", str(prompt_file), "--max_new_tokens", "30", "--num_samples", "3"]
    assert cli_main(["generate", *args, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    samples = out.split("--- sample ")[1:]
    assert len(samples) == 3 and all(s.split("\n", 1)[1].startswith("\\xffabc") for s in samples)
    assert len(set(s.split("\n", 1)[1] for s in samples)) == 1  # greedy: all samples equal
    assert cli_main(["generate", *args, "--top_p", "0.9", "--seed", "3"]) == 0


def test_generate_from_a_checkpoint_of_a_real_fit(tmp_path, monkeypatch, capsys):
    """`fit` through the CLI, then `generate --ckpt_path last` from the run it wrote."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_bytes(b"to be or not to be, that is the question. " * 200)
    BDHCLI(args=[
        "fit", "--data.path", "corpus.txt", "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
        "--model.mlp_internal_dim_multiplier", "8", "--model.learning_rate", "1e-2", "--data.block_size", "32",
        "--data.batch_size", "8", "--data.val_windows", "4", "--trainer.max_steps", "30",
        "--trainer.val_check_interval", "30", "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert Path("lightning_logs/version_0/checkpoints/last.ckpt").is_file()
    capsys.readouterr()
    assert (
        cli_main(
            ["generate", "--ckpt_path", "last", "--prompt", "to be or ", "--max_new_tokens", "40", "--temperature", "0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    model = load_model_from_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt")
    greedy = full_prefix_generate(model, torch.tensor([list(b"to be or ")]), 40)
    assert out == bytes(greedy[0].tolist()).decode("utf-8", errors="backslashreplace") + "\n"


def test_ckpt_path_last_picks_the_newest_run(trained, tmp_path, capsys):
    path, _ = trained
    logs = tmp_path / "logs"
    for version, age in (("version_0", 100), ("version_1", 0), ("version_2", 200)):
        target = logs / version / "checkpoints" / "last.ckpt"
        target.parent.mkdir(parents=True)
        target.write_bytes(path.read_bytes() if version == "version_1" else b"not a checkpoint")
        os.utime(target, (time.time() - age, time.time() - age))
    assert cli_main(["generate", "--ckpt_path", "last", "--logs_dir", str(logs), "--max_new_tokens", "5"]) == 0


class Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be a positive integer"),
        (["--max_new_tokens", "-3"], "--max_new_tokens must be a positive integer"),
        (["--num_samples", "0"], "--num_samples must be a positive integer"),
        (["--chunk_size", "0"], "--chunk_size must be a positive integer"),
        (["--top_k", "0"], "--top_k must be in 1..256"),
        (["--top_k", "257"], "--top_k must be in 1..256"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--temperature", "-0.1"], "--temperature must be in [0, 10000]"),
        (["--temperature", "1e-45"], "too small"),
        (["--temperature", "nan"], 'Parser key "temperature"'),
        (["--temperature", "hot"], 'Parser key "temperature"'),
        (["--prompt", "a", "--prompt_file", "p.txt"], "not both"),
        (["--prompt_file", "no_such_prompt.txt"], "cannot read it"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = cli_main(["generate", "--ckpt_path", str(tmp_path / "never_read.ckpt"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "kind", ["missing", "directory", "corrupt", "truncated", "pickle_payload", "not_bdh", "no_logs"]
)
def test_bad_checkpoints_get_one_line_and_exit_2(trained, tmp_path, capfd, kind):
    path = tmp_path / "model.ckpt"
    if kind == "directory":
        path.mkdir()
    elif kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        good, _ = trained
        path.write_bytes(good.read_bytes()[:5000])
    elif kind == "pickle_payload":
        torch.save({"state_dict": {}, "hyper_parameters": Payload()}, path)
    elif kind == "not_bdh":
        torch.save({"state_dict": {"model.something": torch.zeros(3)}, "hyper_parameters": TINY}, path)
    ckpt = "last" if kind == "no_logs" else str(path)
    code = cli_main(["generate", "--ckpt_path", ckpt, "--logs_dir", str(tmp_path / "logs"), "--max_new_tokens", "5"])
    captured = capfd.readouterr()  # file descriptors: os.system would write there
    assert code == 2 and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "must never run" not in captured.out


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_generate_precision_is_float32_on_cpu(trained, tmp_path, capsys, precision):
    """--precision chooses the GPU's compute dtype; on the CPU the text is float32's, byte for byte, and says so."""
    path, _ = trained
    args = ["generate", "--ckpt_path", str(path), "--prompt", "ab", "--max_new_tokens", "40", "--seed", "2"]
    assert cli_main([*args, "--precision", "32"]) == 0
    full = capsys.readouterr()
    assert cli_main([*args, "--precision", precision]) == 0
    lower = capsys.readouterr()
    assert lower.out == full.out
    assert ", cpu, torch.float32]" in lower.err and ", cpu, torch.float32]" in full.err
    assert cli_main([*args, "--precision", "fp8"]) == 2
    assert "precision" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recurrent_generation_under_autocast_keeps_a_float32_state(dtype):
    """What `generate --precision bf16/16` runs on a GPU, under CPU autocast: N-wide products in 16 bits, the state
    float32, logits close to float32's."""
    model = random_model(seed=3, std=0.05)
    prompt = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        exact = Generator(model, 2)
        want = [exact.prefill(prompt, chunk_size=8)]
        low = Generator(model, 2)
        with torch.autocast("cpu", dtype=dtype):
            got = [low.prefill(prompt, chunk_size=8)]
            for byte in prompt[:, :5].T:
                got.append(low.step(byte))
        for byte in prompt[:, :5].T:
            want.append(exact.step(byte))
    assert all(state.dtype == torch.float32 for state in low.states)
    assert low.position == exact.position == 25
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        scale = w.abs().max().item()
        assert (g.float() - w).abs().max().item() <= 5e-2 * scale
    assert any((g.float() - w).abs().max() > 0 for g, w in zip(got, want))  # 16-bit did run


def default_ctrl_c() -> None:
    """A terminal's Ctrl-C reaches a foreground command with SIGINT at its default; a test run started in the
    background (`pytest &` in a script, nohup) hands its children SIGINT ignored, which Python then keeps."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_generate_exits_130_with_one_line(trained, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV

    path, _ = trained
    proc = subprocess.Popen([sys.executable, "-m", "bdh_lightning", "generate", "--ckpt_path", str(path), "--prompt", "hi",
                             "--max_new_tokens", "100000000"],
                            cwd=tmp_path, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_ctrl_c)  # fmt: skip
    assert proc.stdout.read(2) == b"hi"  # the prompt streams first: generation has begun
    status = Path(f"/proc/{proc.pid}/status").read_text()
    signals = [line for line in status.splitlines() if line.startswith(("State", "Sig", "ShdPnd", "Threads"))]
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)  # drains both pipes
    except subprocess.TimeoutExpired:
        after = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f"no exit 120 s after SIGINT; before {signals}, after {after}: {stderr[-2000:]}") from None
    assert proc.returncode == 130, stderr.decode()[-2000:]
    lines = stderr.decode().strip().splitlines()
    assert "Traceback" not in stderr.decode() and lines[-1] == "interrupted", lines


def sampled_from(monkeypatch, logits, **settings) -> torch.Tensor:
    """The distribution sample_next draws from (what it hands torch.multinomial), normalised."""
    seen = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, **kw: seen.append(probs) or multinomial(probs, n, **kw))
    sample_next(logits, **settings)
    return seen[0] / seen[0].sum(dim=-1, keepdim=True)


def test_sampling_draws_from_the_stated_distribution(monkeypatch):
    """softmax(logits / temperature), then only the top_k most likely, then the most likely bytes until their mass
    reaches top_p (a byte whose mass before it equals top_p is out); top_p 1 keeps every byte, however unlikely."""
    logits = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)) * 3
    plain = F.softmax(logits / 0.5, dim=-1)
    torch.testing.assert_close(sampled_from(monkeypatch, logits, temperature=0.5), plain)
    top5 = logits.topk(5, dim=-1).indices
    kept = torch.zeros_like(plain).scatter(-1, top5, plain.gather(-1, top5))
    torch.testing.assert_close(sampled_from(monkeypatch, logits, temperature=0.5, top_k=5), kept / kept.sum(-1, True))
    probs = F.softmax(logits, dim=-1)
    ordered = probs.sort(dim=-1, descending=True).values
    mass_before = ordered.cumsum(dim=-1) - ordered
    top_p = mass_before[0, 3].item()  # row 0: the 4th byte's mass before it is exactly top_p
    nucleus = sampled_from(monkeypatch, logits, top_p=top_p)
    assert (nucleus[0] > 0).sum() == 3
    assert (nucleus[1] > 0).sum() == (mass_before[1] < top_p).sum()
    certain = torch.full((1, 256), -30.0)
    certain[0, 7] = 30.0  # the other bytes' mass before them rounds to 1.0 in float32
    assert (sampled_from(monkeypatch, certain, top_p=1.0) > 0).all()


def test_generate_text_passes_top_k_and_defaults_to_temperature_1():
    model = random_model(seed=4, std=0.3)
    greedy = generate_text(model, b"ab", 20, temperature=0)
    assert generate_text(model, b"ab", 20, top_k=1, seed=3) == greedy
    assert generate_text(model, b"ab", 20, seed=3) == generate_text(model, b"ab", 20, temperature=1.0, seed=3)
    assert generate_text(model, b"ab", 20, seed=3) != generate_text(model, b"ab", 20, temperature=2.0, seed=3)


def test_sample_bytes_yields_one_sample_by_default():
    """Catches another default for `num_samples`: each step yields a tensor of one byte per sample."""
    steps = list(sample_bytes(random_model(), b"ab", 3, seed=1))
    assert [step.shape for step in steps] == [torch.Size([1])] * 3


def test_the_generators_state_is_float32_whatever_the_default_dtype():
    model = random_model()
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        states = Generator(model, batch_size=3).states
    finally:
        torch.set_default_dtype(default)
    assert len(states) == model.config.n_layer
    assert all(s.dtype == torch.float32 and s.shape == (3, 2, model.config.neurons_per_head, 32) for s in states)


def test_generation_refuses_a_state_faded_per_training_window():
    model = random_model(carry_half_lives=(64.0,))
    with pytest.raises(ConfigError, match="^generation reads a stream byte by byte, but model.carry_half_lives"):
        generate_text(model, b"ab", 3, seed=0)
