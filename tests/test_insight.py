"""`inspect` against planted truths: a graph with known communities, a neuron wired to one byte, a known
power-law exponent, the monitor's sparsity counts; and the command on a tiny trained checkpoint."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, TINY_MODEL, run_cli, write_phrases
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bdh_lightning.data.corpus import read_corpus
from bdh_lightning.insight import InsightMonitor, NeuronOptions
from bdh_lightning.insight.activations import CorpusSample, activation_pass, sparsity_report, strongest_contexts
from bdh_lightning.insight.command import model_at_init
from bdh_lightning.insight.graph import (
    degrees,
    fit_power_law,
    graph_report,
    louvain_modularity,
    modularity,
    thresholded_edges,
    undirected_edges,
)
from bdh_lightning.insight.probes import probe_report
from bdh_lightning.main import main
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.module import BDHLitModule
from bdh_lightning.monitor import count_active


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block_model(communities: int = 8, size: int = 16, dims: int = 4, seed: int = 0) -> BDH:
    """One head whose G = decoder @ encoder is block-diagonal: neuron i writes to, and neuron j reads from,
    only the `dims` embedding dimensions of its own community, with positive weights."""
    D, N = communities * dims, communities * size
    config = BDHConfig(n_layer=1, n_embd=D, n_head=1, mlp_internal_dim_multiplier=N // D, dropout=0.0)
    model = BDH(config)
    gen = torch.Generator().manual_seed(seed)
    decoder = torch.zeros(N, D)
    encoder = torch.zeros(D, N)
    for c in range(communities):
        rows, cols = slice(c * size, (c + 1) * size), slice(c * dims, (c + 1) * dims)
        decoder[rows, cols] = 1 + 0.01 * torch.rand(size, dims, generator=gen)
        encoder[cols, rows] = 1 + 0.01 * torch.rand(dims, size, generator=gen)
    with torch.no_grad():
        model.decoder.copy_(decoder)
        model.encoder[0].copy_(encoder)
    return model.eval()


def test_thresholded_edges_are_the_largest_entries_of_the_dense_product():
    gen = torch.Generator().manual_seed(1)
    decoder, encoder = torch.randn(96, 16, generator=gen), torch.randn(16, 96, generator=gen)
    dense = decoder @ encoder
    dense.fill_diagonal_(-float("inf"))
    src, dst, threshold = thresholded_edges(decoder, encoder, edges=300, block_rows=17)
    expected = set(zip(*np.unravel_index(dense.flatten().topk(300).indices.numpy(), dense.shape)))
    assert set(zip(src.tolist(), dst.tolist())) == {(int(i), int(j)) for i, j in expected}
    assert threshold == pytest.approx(float(dense.flatten().topk(300).values.min()))
    src, dst, _ = thresholded_edges(decoder, encoder, threshold=2.0, block_rows=10)
    assert set(zip(src.tolist(), dst.tolist())) == {tuple(e) for e in (dense > 2.0).nonzero().tolist()}
    src, dst, _ = thresholded_edges(decoder[:5], encoder[:, :5], edges=100)  # more than the 20 off-diagonal entries
    assert len(src) == 20 and not (src == dst).any()


def test_louvain_finds_planted_communities_and_random_init_has_no_excess_modularity():
    model = block_model()
    report = graph_report(model)
    head = report["heads"][0]
    assert head["modularity"] > 0.5 and head["communities"] == 8
    # Louvain's communities are the planted blocks (less any neuron the threshold left without an edge).
    src, dst, _ = thresholded_edges(model.decoder.detach(), model.encoder[0].detach(), edges=5 * 128)
    _, found = louvain_modularity(src, dst, 128, seed=0)
    linked = set(src.tolist()) | set(dst.tolist())
    assert head["isolated"] == 128 - len(linked) < 4
    assert sorted(map(sorted, found)) == [sorted(set(range(c * 16, (c + 1) * 16)) & linked) for c in range(8)]
    assert head["modularity"] - head["null_modularity"] > 0.2
    # The same code on the same architecture at initialisation: no more modular than a random graph.
    init = graph_report(model_at_init(model.config, seed=1337))
    for head in init["heads"]:
        assert abs(head["modularity"] - head["null_modularity"]) < 0.05, head


def test_modularity_is_networkx_modularity():
    import networkx as nx

    rng = np.random.default_rng(2)
    src, dst = rng.integers(0, 60, 300), rng.integers(0, 60, 300)
    pairs = undirected_edges(src, dst)
    labels = rng.integers(0, 5, 60)
    graph = nx.Graph(pairs.tolist())
    communities = [{int(i) for i in np.flatnonzero(labels == c) if i in graph} for c in range(5)]
    assert modularity(pairs, labels) == pytest.approx(nx.community.modularity(graph, communities), abs=1e-12)


def test_power_law_exponent_is_recovered():
    rng = np.random.default_rng(0)
    n = 20000
    out_degree = np.minimum(rng.zipf(2.5, size=n), n - 1)  # P(k) ~ k^-2.5
    src = np.repeat(np.arange(n), out_degree)
    dst = rng.integers(0, n, size=src.size)
    _, d_out = degrees(src, dst, n)
    fit = fit_power_law(d_out)
    assert abs(fit["alpha"] - 2.5) < 0.2 and not fit["at_bound"], fit
    poisson = fit_power_law(rng.poisson(5, size=n))  # no heavy tail
    assert poisson["alpha"] > 4, poisson


Q = ord("Q")


def byte_neuron_model(neuron: int = 62) -> BDH:
    """A random model with neuron `neuron` of head 0 wired to fire only where the input byte is 'Q': every
    embedding is -2 in dimension 0 except Q's (+6), and that neuron reads dimension 0 alone."""
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0))
    with torch.no_grad():
        model.embed.weight.normal_(0, 1)
        model.embed.weight[:, 0] = -2.0
        model.embed.weight[Q, 0] = 6.0
        for weights in (model.encoder, model.encoder_v):
            weights[0, :, neuron] = 0.0
            weights[0, 0, neuron] = 1.0
    return model.eval()


def sentences(count: int, with_q: bool, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        letters = bytearray(rng.integers(97, 123, size=int(rng.integers(20, 40))).tolist())
        if with_q:
            for place in rng.choice(len(letters), size=3, replace=False):
                letters[place] = Q
        out.append(bytes(letters))
    return out


def q_corpus(path, size: int = 20000):
    rng = np.random.default_rng(3)
    text = rng.integers(97, 123, size=size)
    text[rng.random(size) < 0.04] = Q
    path.write_bytes(bytes(text.tolist()))
    return path


@pytest.mark.parametrize("signal", ["a", "ab"])
def test_a_neuron_wired_to_one_byte_is_found_by_probe_and_contexts(tmp_path, signal):
    model, neuron = byte_neuron_model(), "h0:62"
    probe = probe_report(model, sentences(50, True, 1), sentences(50, False, 2), signal, top=3)
    best = probe["neurons"][0]
    assert best["neuron"] == neuron and best["p"] < 1e-6 and best["U"] == 2500 and best["rank_biserial"] == 1.0
    sample = CorpusSample(read_corpus(str(q_corpus(tmp_path / "q.txt"))), block_size=64, windows=16, val_fraction=1.0)
    report = sparsity_report(model, sample, NeuronOptions(top=3, contexts=8, signal=signal))
    contexts = strongest_contexts(report, sample, best["index"], width=10)
    assert [c["byte"] for c in contexts] == ["Q"] * 8
    assert all(sample.corpus.read(c["offset"], 1)[0] == Q for c in contexts)


def test_sentence_values_are_each_sentence_read_alone(monkeypatch):
    import bdh_lightning.insight.activations as insight

    torch.manual_seed(0)
    model = BDH(BDHConfig(**TINY_MODEL)).eval()
    texts = [b"a longer sentence here", b"short", b"mid length one", b"x", b"another fairly long sentence"]
    monkeypatch.setattr(insight, "ELEMENT_BUDGET", 3 * 14 * 2 * 128)  # several batches of unequal lengths
    batched = insight.sentence_values(model, texts, "ab")
    for row, text in enumerate(texts):
        idx = torch.tensor([list(text)])
        alone = activation_pass(model, idx, signal="ab").pooled.flatten(2).mean(1)[0]
        assert torch.allclose(batched[row], alone, atol=1e-6), text


def test_sparsity_counts_equal_the_monitors():
    torch.manual_seed(0)
    model = BDH(BDHConfig(**TINY_MODEL, dropout=0.1)).eval()
    with torch.no_grad():
        model.encoder.normal_(0, 0.3)  # a less even split than at init
    idx = torch.randint(0, 256, (3, 40))
    seen = activation_pass(model, idx, idx)
    assert torch.equal(seen.counts.sum(1), count_active(model, idx).cpu())
    assert torch.equal(seen.position_active.sum((1, 2)), seen.counts.sum((0, 1)))
    assert torch.equal(seen.fires.sum((1, 2)), seen.counts.sum((0, 1)))


def test_sparsity_report_fractions_are_the_monitor_counts(tmp_path):
    torch.manual_seed(0)
    model = BDH(BDHConfig(**TINY_MODEL)).eval()
    corpus = read_corpus(str(write_phrases(tmp_path / "c.txt", size=5000)))
    sample = CorpusSample(corpus, block_size=32, windows=5, val_fraction=0.5)
    report = sparsity_report(model, sample)
    idx = torch.cat([w for _, w, _ in sample.batches(100)])
    counts = count_active(model, idx).double()
    entries = idx.numel() * model.config.n_head * model.config.neurons_per_head
    for layer, row in enumerate(report["per_layer"]):
        assert [row[k] for k in ("a", "b", "ab")] == pytest.approx((counts[layer] / entries).tolist(), abs=0, rel=1e-12)


def test_model_at_init_is_what_fit_starts_from():
    L.seed_everything(1234)
    module = BDHLitModule(**TINY_MODEL)
    init = model_at_init(module.config, 1234)
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, init.state_dict()[name]), name


def test_tensorboard_callback_logs_graph_and_firing_rates(tmp_path):
    L.seed_everything(0)
    module = BDHLitModule(**TINY_MODEL)
    data = torch.randint(0, 256, (40, 17))
    pairs = list(zip(data[:, :-1], data[:, 1:]))
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path),
        callbacks=[InsightMonitor(every_n_validations=2)], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(
        module,
        torch.utils.data.DataLoader(pairs[:32], batch_size=8),
        torch.utils.data.DataLoader(pairs[32:], batch_size=4),
    )
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    modularity = events.Scalars("insight/modularity")
    # The 2nd of 2 validations, at the step Lightning gives that validation's scalars.
    val_steps = [e.step for e in events.Scalars("val/loss")]
    assert [e.step for e in modularity] == val_steps[-1:] and 0 < modularity[0].value < 1
    assert 0 <= events.Scalars("insight/dead_ab")[0].value <= 1
    assert {"insight/degrees", "insight/firing_rates"} <= set(events.Tags()["images"])


# ---------------------------------------------------------------------------------------------------------
# The command on a tiny trained checkpoint (trained in this process), from a shell and through `main`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = write_phrases(root / "corpus.txt", size=20000)
    with pytest.MonkeyPatch.context() as patch:  # a module fixture: no function-scoped monkeypatch
        patch.chdir(root)
        fit = ["fit", "--data.path", str(corpus), *TINY_ARGS, "--trainer.max_steps", "10", "--sample.length", "0"]
        assert main(fit) == 0
    return root


def test_inspect_writes_the_report(trained):
    (trained / "concept.txt").write_text("the cat sat\nthe cat ran\n\n")
    (trained / "control.txt").write_text("a dog sat\na dog ran\n")
    probe = ["--probe.concept", "concept.txt", "--probe.control", "control.txt", "--probe.top", "3"]
    done = run_cli(trained, "inspect", "--ckpt_path", "last", "--output", "report", "--data.windows", "4", *probe)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparsity: active a" in done.stdout and "Louvain modularity" in done.stdout and "probe:" in done.stdout
    out = trained / "report"
    for name in (
        "report.html",
        "report.json",
        "degrees.png",
        "firing_rates.png",
        "sparsity_layers.png",
        "active_vs_loss.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 10 and report["model"]["neurons_per_head"] == 128
    for side in ("trained", "init"):
        assert set(report["sparsity"][side]) >= {
            "active",
            "per_layer",
            "per_layer_head",
            "neurons",
            "active_vs_loss",
            "selective",
        }
        assert set(report["graph"][side]) >= {"heads", "modularity", "null_modularity", "in_degree", "out_degree"}
        assert len(report["probe"][side]["neurons"]) == 3
    assert report["probe"]["trained"]["concept_sentences"] == 2
    assert report["graph"]["init"]["edges"] == report["graph"]["trained"]["edges"] == 2 * 5 * 128
    check_values_independently(trained, report)


def oracle_pooled(model: BDH, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, H*N): each neuron's a*b averaged over layers, from the spec oracle's plain layer (head-major)."""
    from spec_oracle import oracle_layer_norm, oracle_rope

    x = oracle_layer_norm(model.embed.weight[idx])
    H, T = model.config.n_head, idx.shape[1]
    strictly_lower = torch.tril(torch.ones(T, T), diagonal=-1)
    pooled = 0
    for _ in range(model.config.n_layer):
        z = []
        for h in range(H):
            a = torch.relu(x @ model.encoder[h])
            q = oracle_rope(a, torch.arange(T))
            y = oracle_layer_norm(((q @ q.transpose(-1, -2)) * strictly_lower) @ x)
            z.append(a * torch.relu(y @ model.encoder_v[h]))
        z = torch.cat(z, dim=-1)
        pooled = pooled + z
        x = oracle_layer_norm(x + oracle_layer_norm(z @ model.decoder))
    return pooled / model.config.n_layer


@torch.no_grad()
def check_values_independently(root, report: dict) -> None:
    """The report's numbers against plain recomputations: the degrees of each head's dense G, the active
    fractions of the sparsity monitor, the probe's U from the spec oracle's neuron values and scipy."""
    from scipy.stats import mannwhitneyu

    from bdh_lightning.checkpoints import find_last
    from bdh_lightning.weights import load_model_from_checkpoint

    model = load_model_from_checkpoint(find_last(root / "lightning_logs"))
    H, N = model.config.n_head, model.config.neurons_per_head
    out_degree, in_degree = [], []
    for h in range(H):
        G = model.decoder[h * N : (h + 1) * N] @ model.encoder[h]
        G.fill_diagonal_(-float("inf"))
        kept = torch.zeros(N * N, dtype=torch.bool)
        kept[G.flatten().topk(5 * N).indices] = True
        out_degree.append(kept.view(N, N).sum(1))
        in_degree.append(kept.view(N, N).sum(0))
    out_degree, in_degree = torch.cat(out_degree), torch.cat(in_degree)
    graph = report["graph"]["trained"]
    assert graph["out_degree"]["max"] == out_degree.max() and graph["in_degree"]["max"] == in_degree.max()
    hub = int(torch.argmax(out_degree))  # the first of the largest, as the report's stable sort
    assert graph["out_degree"]["hubs"][0] == {"neuron": f"h{hub // N}:{hub % N}", "degree": int(out_degree[hub])}
    whole = G_cross_share(model, 5 * H * N)
    assert report["whole_graph"]["trained"][0]["cross_head_share"] == pytest.approx(whole)
    # Sparsity: the monitor's counts over the same windows.
    corpus = read_corpus(str(root / "corpus.txt"))
    data = report["data"]
    sample = CorpusSample(corpus, data["block_size"], data["windows"], 1 - data["from_byte"] / len(corpus))
    idx = torch.cat([w for _, w, _ in sample.batches(100)])
    counts = count_active(model, idx).sum(0).double() / (idx.numel() * H * N * model.config.n_layer)
    assert [report["sparsity"]["trained"]["active"][k] for k in ("a", "b", "ab")] == pytest.approx(counts.tolist())
    # Probe: every neuron's U from the oracle's per-sentence means; the report's best neuron is the largest U.
    values = [oracle_pooled(model, torch.tensor([list(t.encode())]))[0].mean(0) for t in ("the cat sat", "the cat ran")]
    controls = [oracle_pooled(model, torch.tensor([list(t.encode())]))[0].mean(0) for t in ("a dog sat", "a dog ran")]
    U = mannwhitneyu(torch.stack(values).numpy(), torch.stack(controls).numpy(), axis=0).statistic
    best = report["probe"]["trained"]["neurons"][0]
    assert best["U"] == U.max() == U[best["index"]]
    assert best["concept_mean"] == pytest.approx(float(torch.stack(values)[:, best["index"]].mean()), rel=1e-4)


def G_cross_share(model: BDH, edges: int) -> float:
    """The share of the `edges` largest off-diagonal entries of the whole G that join different heads."""
    H, D, N = model.encoder.shape
    G = model.decoder @ model.encoder.permute(1, 0, 2).reshape(D, H * N)
    G.fill_diagonal_(-float("inf"))
    index = G.flatten().topk(edges).indices
    return float(((index // (H * N)) // N != (index % (H * N)) // N).double().mean())


def test_inspect_over_a_run_folder_writes_the_trajectory(trained, monkeypatch, capsys):
    """Through `main` (test_inspect_writes_the_report runs the command from a shell)."""
    monkeypatch.chdir(trained)
    folder = next((trained / "lightning_logs").glob("version_*")) / "checkpoints"
    args = ["--ckpt_path", str(folder), "--output", "trajectory", "--data.windows", "2", "--graph.seeds", "1"]
    assert main(["inspect", *args]) == 0
    out = trained / "trajectory"
    rows = json.loads((out / "trajectory.json").read_text())
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 10 and (out / "trajectory.png").stat().st_size > 0
    for row in rows:
        report = json.loads((out / f"step_{row['step']}" / "report.json").read_text())
        assert row["modularity"] == report["graph"]["trained"]["modularity"]
        assert row["active_ab"] == report["sparsity"]["trained"]["active"]["ab"]
        assert row["init_modularity"] == report["graph"]["init"]["modularity"]
    empty = trained / "no_checkpoints"
    empty.mkdir()
    capsys.readouterr()
    assert main(["inspect", "--ckpt_path", str(empty), "--output", "never"]) == 2
    assert "no checkpoints" in capsys.readouterr().err and not (trained / "never").exists()


BAD_INPUT = {  # arguments, and a word the one-line message must hold
    "missing checkpoint": (["--ckpt_path", "nowhere.ckpt"], "nowhere.ckpt"),
    "empty probe": (["--probe.concept", "empty.txt", "--probe.control", "empty.txt"], "no sentences"),
    "short corpus": (["--data.path", "short.txt"], "fewer than one window"),
    "probe without control": (["--probe.concept", "empty.txt"], "--probe.control"),
    "output is a file": (["--output", "a_file"], "is a file"),
    "one-byte windows": (["--data.block_size", "1"], "at least 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_inspect_refuses_bad_input_in_one_line(trained, case, capsys, monkeypatch):
    """Through `main`, as the command runs (test_inspect_writes_the_report runs it from a shell)."""
    monkeypatch.chdir(trained)
    (trained / "empty.txt").write_text("\n  \n")
    (trained / "short.txt").write_text("too short")
    (trained / "a_file").write_text("keep me")
    args, word = BAD_INPUT[case]
    out = f"out_{case.replace(' ', '_')}"
    if "--ckpt_path" not in args:
        args = ["--ckpt_path", "last", *args]
    if "--output" not in args:
        args = [*args, "--output", out]
    code = main(["inspect", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert word in lines[0], lines[0]
    assert not (trained / out).exists()
    assert (trained / "a_file").read_text() == "keep me"


def test_every_input_safe_inspect_output_full_disk_keeps_the_earlier_report(trained, capsys, monkeypatch):
    """A disk that fills while the report is written: one line naming --output, the earlier report intact, and no
    half-written folder beside it (the report is built in a hidden folder and renamed into place)."""
    import errno

    from bdh_lightning.insight import report as report_module

    monkeypatch.chdir(trained)
    earlier = trained / "kept"
    earlier.mkdir()
    (earlier / "report.json").write_text('{"earlier": true}')
    real_save = report_module.save_png

    def fill_the_disk(figure, path):
        real_save(figure, path)  # one figure lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_module, "save_png", fill_the_disk)
    code = main(["inspect", "--ckpt_path", "last", "--output", "kept", "--data.windows", "2", "--graph.seeds", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot write --output kept (No space left on device)"), lines[0]
    assert sorted(p.name for p in earlier.iterdir()) == ["report.json"]
    assert (earlier / "report.json").read_text() == '{"earlier": true}'
    assert not [p for p in trained.iterdir() if p.name.startswith(".kept")]  # no hidden leftovers
