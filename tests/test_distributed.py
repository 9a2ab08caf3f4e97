"""Data parallelism for real on CPU (gloo): `--trainer.devices 2`, and two "nodes" through torchrun on 127.0.0.1;
SIGTERM to one rank stops all; gradient accumulation equals the larger batch."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from conftest import SUBPROCESS_ENV, finish, scalars, start_process
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from bdh_lightning.main import main
from bdh_lightning.module import BDHLitModule

ENV = SUBPROCESS_ENV


def write_config(folder: Path, trainer: str) -> Path:
    """A tiny run on 60 kB of random letters, recording what every rank trained and validated on."""
    gen = torch.Generator().manual_seed(0)
    (folder / "corpus.txt").write_bytes(bytes(torch.randint(97, 123, (60000,), generator=gen).tolist()))
    config = folder / "run.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
{trainer}
  max_steps: 20
  val_check_interval: 10
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: recorders.WindowRecorder
      init_args: {{out_dir: {folder / "seen"}}}
model: {{n_layer: 2, n_embd: 32, n_head: 2, mlp_internal_dim_multiplier: 8, learning_rate: 3.0e-3}}
data: {{path: corpus.txt, block_size: 32, batch_size: 8, val_windows: 8}}
""")
    return config


def check_one_data_parallel_run(folder: Path) -> None:
    """Two ranks with their own window streams and disjoint validation shares; one log, one set of checkpoints."""
    ranks = [json.loads((folder / f"seen/rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    train0, train1 = ranks[0]["train"], ranks[1]["train"]
    assert len(train0) == len(train1) == 20
    assert not set(train0) & set(train1)  # no batch drawn by both ranks
    seeds0, seeds1 = ranks[0]["seeds"], ranks[1]["seeds"]
    assert len(set(seeds0)) == len(set(seeds1)) == 20 and not set(seeds0) & set(seeds1)  # nor any dropout mask
    val0, val1 = set(ranks[0]["val"]), set(ranks[1]["val"])
    assert len(val0) == len(val1) == 4 and not val0 & val1  # the 8 validation windows, split between the ranks

    logs = folder / "lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    assert len(list(logs.rglob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in logs.rglob("*.ckpt")) == ["best-step20.ckpt", "last.ckpt"]
    assert torch.load(logs / "version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 20
    losses = list(scalars(logs / "version_0", "train/loss").values())
    assert len(losses) == 20 and losses[-1] < losses[0] - 1.0


def test_two_cpu_devices_train_one_model(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "  devices: 2\n  strategy: ddp")
    fit = subprocess.run([sys.executable, "-m", "bdh_lightning", "fit", "--config", str(config)], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    check_one_data_parallel_run(tmp_path)

    # The logged validation loss is the mean over both ranks' windows: the same as one process validating all 8.
    ddp_val_loss = list(scalars(tmp_path / "lightning_logs/version_0", "val/loss").values())[-1]
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    monkeypatch.chdir(tmp_path)  # one process: validated here, not in a child (a launch saved)
    capsys.readouterr()
    code = main(["validate", "--config", str(config), "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--ckpt_path", str(last)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    # validate writes no run folder: its figures are in the table it prints (rich's or plain).
    one_process_val_loss = float(re.search(r"val/loss[^0-9]*([0-9]+\.[0-9]+)", out)[1])
    assert abs(ddp_val_loss - one_process_val_loss) < 1e-5, (ddp_val_loss, one_process_val_loss)


def test_two_nodes_through_torchrun(tmp_path):
    """`torchrun --nnodes 2` twice on one machine, rendezvous on 127.0.0.1, `--trainer.num_nodes 2`.

    No port is chosen free and used later (another process could take it in between): the rendezvous store is
    served by this test on a port the OS picks and holds (both agents join it as clients, c10d rendezvous), and
    the first agent serves the workers' store on a port the OS picks too."""
    config = write_config(tmp_path, "  devices: 1\n  num_nodes: 2\n  strategy: ddp")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    nodes = [
        start_process([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{store.port}", "--rdzv_id", "two-nodes",
                       "--rdzv_conf", "is_host=false", "-m", "bdh_lightning", "fit", "--config", str(config)], tmp_path)
        for _ in (0, 1)
    ]  # fmt: skip
    errors = [finish(node, timeout=300) for node in nodes]
    del store
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    check_one_data_parallel_run(tmp_path)


class GradientRecorder(Callback):
    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {name: p.grad.clone() for name, p in pl_module.named_parameters()}


def one_step(batches: list, accumulate: int) -> tuple[dict, dict]:
    """Gradients and weights after one optimizer step of a tiny BDH in float64 over `batches`."""
    torch.manual_seed(0)
    module = BDHLitModule(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
    recorder = GradientRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate, precision="64-true",
                        callbacks=[recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 1
    return recorder.grads, {name: p.detach().clone() for name, p in module.named_parameters()}


def test_gradient_accumulation_gives_the_larger_batch_update():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (8, 16), generator=gen), torch.randint(0, 256, (8, 16), generator=gen)
    big_grads, big_weights = one_step([(x, y)], accumulate=1)
    acc_grads, acc_weights = one_step([(x[:4], y[:4]), (x[4:], y[4:])], accumulate=2)
    half_grads, _ = one_step([(x[:4], y[:4])], accumulate=1)
    assert not torch.allclose(half_grads["model.encoder"], big_grads["model.encoder"])  # the halves do differ
    for name in big_grads:
        torch.testing.assert_close(acc_grads[name], big_grads[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(acc_weights[name], big_weights[name], rtol=1e-10, atol=1e-14)


def test_sigterm_to_rank_zero_stops_every_rank_with_one_checkpoint(tmp_path):
    """A pre-emption notice that reaches only rank 0: both ranks stop after the same step, one checkpoint is saved."""
    config = write_config(tmp_path, "  devices: 2\n  strategy: ddp")
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    fit = start_process([sys.executable, "-m", "bdh_lightning", "fit", "--config", str(config), "--trainer.max_steps", "100000",
                         "--checkpoint.every_n_train_steps", "3"], tmp_path)  # fmt: skip
    deadline = time.monotonic() + 120
    while not last.exists():
        assert fit.poll() is None and time.monotonic() < deadline, "training never saved a checkpoint"
        time.sleep(0.05)
    fit.send_signal(signal.SIGTERM)  # to the launching process (rank 0) only
    stderr = finish(fit, timeout=120)
    assert fit.returncode == 143, stderr[-3000:]
    stops = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 2 and stops[0].startswith("stopped by SIGTERM") != stops[1].startswith("stopped by SIGTERM"), (
        stderr[-4000:]
    )
    steps = {line.split("after step ")[1].split(";")[0] for line in stops}
    assert len(steps) == 1  # the same step on both ranks
    assert torch.load(last, weights_only=True)["global_step"] == int(steps.pop())


def test_dataloader_workers_started_by_spawn_get_the_same_batches(tmp_path):
    """Workers started with `spawn` (the default on macOS and Windows, and what CUDA needs) receive the dataset
    pickled: it must survive the trip (no open file handles, memory maps or lambdas) and give the same batches."""
    from conftest import write_letters

    from bdh_lightning.data import ByteDataModule

    data = ByteDataModule(
        str(write_letters(tmp_path / "corpus.txt")), block_size=16, batch_size=4, val_windows=6, num_workers=0
    )
    data.setup("fit")
    in_process_train = data.train_dataloader()
    in_process_val = data.val_dataloader()
    expected_train = [batch for _, batch in zip(range(6), in_process_train)]
    expected_val = list(in_process_val)
    spawned = dict(batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got_train = [batch for _, batch in zip(range(6), DataLoader(in_process_train.dataset, **spawned))]
    got_val = list(DataLoader(in_process_val.dataset, **{**spawned, "num_workers": 1}))  # each spawn costs an import
    assert len(got_train) == 6 and len(got_val) == len(expected_val) >= 2
    for got, want in zip(got_train + got_val, expected_train + expected_val):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_two_ranks_carry_their_own_streams_and_resume_exactly(tmp_path):
    """data.sampling streams + model.carry_state on two CPU ranks: each rank carries the state of its own
    streams, every rank's state is in the checkpoint, and a run resumed halfway ends with the same weights as
    the straight run, bit for bit."""
    from conftest import TINY_ARGS, write_letters

    write_letters(tmp_path / "corpus.txt")
    args = [*TINY_ARGS, "--data.path", "corpus.txt", "--data.sampling", "streams", "--model.carry_state", "true",
            "--model.dropout", "0.1", "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.val_check_interval", "4", "--checkpoint.every_n_train_steps", "2",
            "--sample.length", "0", "--sparsity.max_batches", "1"]  # fmt: skip

    def fit(root: str, steps: int, *extra: str) -> Path:
        command = [sys.executable, "-m", "bdh_lightning", "fit", *args, "--trainer.max_steps", str(steps)]
        run = subprocess.run([*command, "--trainer.default_root_dir", root, *extra], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        versions = sorted((tmp_path / root / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
        return versions[-1] / "checkpoints/last.ckpt"  # a resumed run writes a version of its own

    # Every checkpoint kept (save_top_k -1), the one at step 2 named so: two launches, not three.
    keep = ["--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "step", "--checkpoint.mode", "max",
            "--checkpoint.filename", "at-step{step}"]  # fmt: skip
    last = fit("a", 4, *keep)
    straight = torch.load(last, weights_only=True)
    carried = straight["carried_state"]  # ranks, layers, batch rows, heads, N, D
    assert carried.shape[:3] == (2, 2, 2) and carried.abs().sum() > 0
    assert not torch.equal(carried[0], carried[1])  # two ranks, two sets of streams
    halfway = next(last.parent.glob("at-step*2*.ckpt"))
    assert torch.load(halfway, weights_only=True)["global_step"] == 2
    resumed = torch.load(fit("a", 4, "--ckpt_path", str(halfway)), weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert torch.equal(resumed["carried_state"], carried)
