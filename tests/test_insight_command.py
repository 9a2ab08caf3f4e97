"""insight/command.py in-process: the run's settings, the corpus sample it opens, the options' checks word for word,
the seed, the checkpoints of a run folder, and one whole `inspect` of a tiny checkpoint (test_insight.py runs the
command line itself in child processes)."""

from __future__ import annotations

import errno
import json
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS, TINY_MODEL, write_phrases

from bdh_lightning.errors import DataError, ResourceError, UsageError
from bdh_lightning.insight import command
from bdh_lightning.insight.command import (
    check_options,
    check_output,
    inspect_command,
    model_at_init,
    open_sample,
    run_checkpoints,
    run_seed,
    run_settings,
)
from bdh_lightning.insight.options import DataOptions, GraphOptions, NeuronOptions, ProbeOptions
from bdh_lightning.model import BDH, BDHConfig


def test_run_settings_are_the_config_yaml_beside_the_checkpoints_folder(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    assert run_settings(ckpt) == {}
    (tmp_path / "config.yaml").write_text("seed_everything: 7\ndata:\n  path: corpus.txt\n")
    assert run_settings(ckpt) == {"seed_everything": 7, "data": {"path": "corpus.txt"}}
    (tmp_path / "config.yaml").write_text("data: [unclosed\n")
    assert run_settings(ckpt) == {}
    (tmp_path / "config.yaml").write_text("- a list\n")
    assert run_settings(ckpt) == {}


def test_model_at_init_is_fits_draw_and_leaves_the_global_generator_alone():
    config = BDHConfig(**TINY_MODEL)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = model_at_init(config, 5)
    assert torch.equal(torch.random.get_rng_state(), before) and not model.training
    torch.manual_seed(5)
    expected = BDH(config)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_the_output_folder_must_be_new_empty_or_an_earlier_report(tmp_path):
    check_output(tmp_path / "new")
    check_output(tmp_path)  # empty
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError) as error:
        check_output(tmp_path / "file.txt")
    assert str(error.value) == f"--output {tmp_path / 'file.txt'} is a file; give a folder for the report"
    with pytest.raises(UsageError) as error:
        check_output(tmp_path)
    assert str(error.value) == (
        f"--output {tmp_path} holds other files; give a new or empty folder (an earlier report there is replaced)"
    )
    for name in ("report.json", "trajectory.json"):
        earlier = tmp_path / name.split(".")[0]
        earlier.mkdir()
        (earlier / "old.png").write_text("x")
        (earlier / name).write_text("{}")
        check_output(earlier)


def fake_model(n_head=2, n_embd=32, neurons_per_head=128, n_layer=2):
    config = SimpleNamespace(n_head=n_head, n_embd=n_embd, neurons_per_head=neurons_per_head, n_layer=n_layer)
    return SimpleNamespace(config=config)


@pytest.fixture
def corpus(tmp_path):
    return write_phrases(tmp_path / "corpus.txt", size=5000)


def test_the_smallest_window_is_2_bytes(corpus):
    assert open_sample(DataOptions(path=str(corpus), windows=2, block_size=2), {}, fake_model())[0].block_size == 2


def test_the_sample_reads_the_given_corpus_or_the_runs(corpus):
    sample, name = open_sample(
        DataOptions(path=str(corpus), windows=3, block_size=20, val_fraction=0.5), {}, fake_model()
    )
    assert name == str(corpus) and sample.block_size == 20 and len(sample.offsets) == 3
    assert sample.split_start == 2500 and len(sample.corpus) == 5000
    run = {"data": {"path": str(corpus), "block_size": 40, "val_fraction": 0.2}}
    sample, name = open_sample(DataOptions(windows=2), run, fake_model())
    assert (name, sample.block_size, sample.split_start) == (str(corpus), 40, 4000)
    run["data"]["block_size"] = 1024  # the run's windows, at most 256 bytes
    assert open_sample(DataOptions(windows=2), run, fake_model())[0].block_size == 256
    sample, _ = open_sample(DataOptions(path=str(corpus), windows=2), {}, fake_model())
    assert (sample.block_size, sample.split_start) == (256, 4500)  # the defaults: 256 bytes, the last tenth


@pytest.mark.parametrize(
    "model, windows",
    [(fake_model(), 16), (fake_model(n_head=4, n_embd=256, neurons_per_head=8192, n_layer=6), 16),
     (fake_model(n_head=4, n_embd=256, neurons_per_head=8192, n_layer=12), 13),
     (fake_model(n_head=4, n_embd=512, neurons_per_head=16384, n_layer=12), 3),
     (fake_model(n_head=8, n_embd=1024, neurons_per_head=32768, n_layer=12), 2)],
)  # fmt: skip
def test_the_default_window_count_keeps_a_pass_near_2_tflop(corpus, model, windows):
    """windows = round(2e12 / (6 H D N L T)), between 2 and 16 (T = 256)."""
    sample, _ = open_sample(DataOptions(path=str(corpus)), {}, model)
    assert len(sample.offsets) == windows


def test_the_tiny_shakespeare_name_is_the_cached_download(corpus, monkeypatch):
    monkeypatch.setattr(command, "download_tinyshakespeare", lambda: corpus)
    sample, name = open_sample(DataOptions(path=command.TINYSHAKESPEARE, windows=2), {}, fake_model())
    assert name == command.TINYSHAKESPEARE and len(sample.corpus) == 5000


@pytest.mark.parametrize(
    "data, settings, error, message",
    [(DataOptions(), {}, UsageError, "no corpus: the run's config.yaml names none; give --data.path FILE"),
     (DataOptions(), {"data": None}, UsageError, "no corpus: the run's config.yaml names none"),
     (DataOptions(block_size=1), None, UsageError,
      "data.block_size must be an integer of at least 2 (bytes per window), got 1"),
     (DataOptions(windows=0), None, UsageError, "data.windows must be"),
     (DataOptions(val_fraction=0.0), None, UsageError, "data.val_fraction must be"),
     (DataOptions(val_fraction=1.5), None, UsageError, "data.val_fraction must be")],
)  # fmt: skip
def test_bad_sample_settings_are_one_line(corpus, data, settings, error, message):
    if settings is None:
        data = DataOptions(**{**data.__dict__, "path": str(corpus)})
        settings = {}
    with pytest.raises(error) as raised:
        open_sample(data, settings, fake_model())
    assert str(raised.value).startswith(message) and type(raised.value) is error


def test_a_missing_corpus_says_where_the_path_came_from(tmp_path):
    missing = str(tmp_path / "gone.txt")
    with pytest.raises(DataError) as given:
        open_sample(DataOptions(path=missing), {}, fake_model())
    with pytest.raises(DataError) as from_run:
        open_sample(DataOptions(), {"data": {"path": missing}}, fake_model())
    assert missing in str(given.value) and not str(given.value).endswith("(the run's data.path; give --data.path)")
    assert str(from_run.value) == f"{given.value} (the run's data.path; give --data.path)"


@pytest.mark.parametrize(
    "graph, neurons, probe, message",
    [(GraphOptions(mean_degree=0.0), NeuronOptions(), ProbeOptions(), "graph.mean_degree must be"),
     (GraphOptions(threshold=float("nan")), NeuronOptions(), ProbeOptions(), "graph.threshold must be"),
     (GraphOptions(hubs=-1), NeuronOptions(), ProbeOptions(), "graph.hubs must be a non-negative integer, got -1"),
     (GraphOptions(), NeuronOptions(), ProbeOptions(permutations=-1), "probe.permutations must be a non-negative"),
     (GraphOptions(), NeuronOptions(top=0), ProbeOptions(), "neurons.top must be"),
     (GraphOptions(), NeuronOptions(contexts=0), ProbeOptions(), "neurons.contexts must be"),
     (GraphOptions(), NeuronOptions(), ProbeOptions(top=0), "probe.top must be"),
     (GraphOptions(seeds=0), NeuronOptions(), ProbeOptions(), "graph.seeds must be"),
     (GraphOptions(), NeuronOptions(width=-1), ProbeOptions(), "neurons.width must be a non-negative integer"),
     (GraphOptions(), NeuronOptions(), ProbeOptions(concept="a.txt"),
      "give both --probe.concept and --probe.control (one sentence per line each), or neither"),
     (GraphOptions(), NeuronOptions(), ProbeOptions(control="b.txt"), "give both --probe.concept")],
)  # fmt: skip
def test_bad_options_are_one_line_naming_the_option(graph, neurons, probe, message):
    with pytest.raises(UsageError) as error:
        check_options(graph, neurons, probe)
    assert str(error.value).startswith(message)


def test_edge_values_of_the_options_are_accepted():
    check_options(GraphOptions(threshold=-0.5, hubs=0, mean_degree=0.1), NeuronOptions(width=0, top=1, contexts=1),
                  ProbeOptions(permutations=0, top=1, concept="a", control="b"))  # fmt: skip


@pytest.mark.parametrize(
    "seed, settings, chosen",
    [(5, {"seed_everything": 42}, 5), (0, {"seed_everything": 42}, 0), (None, {"seed_everything": 42}, 42),
     (None, {}, 1337), (None, {"seed_everything": True}, 1337), (None, {"seed_everything": "x"}, 1337)],
)  # fmt: skip
def test_the_seed_is_the_given_one_else_the_runs_else_fits_default(seed, settings, chosen):
    assert run_seed(seed, settings) == chosen


def test_a_run_folder_gives_one_checkpoint_per_step(tmp_path):
    folder = tmp_path / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    for name, step in (("step=3.ckpt", 3), ("step=6.ckpt", 6), ("last.ckpt", 6), ("weights.ckpt", None)):
        torch.save({"state_dict": {}, **({"global_step": step} if step else {})}, folder / name)
    (folder / "notes.txt").write_text("x")
    assert run_checkpoints(tmp_path) == [(3, folder / "step=3.ckpt"), (6, folder / "last.ckpt")]
    (tmp_path / "version_0" / "empty").mkdir()
    with pytest.raises(UsageError) as error:
        run_checkpoints(tmp_path / "version_0" / "empty")
    assert str(error.value) == (
        f"--ckpt_path {tmp_path / 'version_0' / 'empty'} is a folder with no checkpoints (*.ckpt) in it; "
        "give a run's folder"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 6 steps, validated every 2, trained in-process: checkpoints at steps 4 and 6 (the one due at
    step 2 comes before its validation, so there is no val/loss to rank it by yet)."""
    from bdh_lightning.cli import BDHCLI

    folder = tmp_path_factory.mktemp("inspect_command")
    corpus = write_phrases(folder / "corpus.txt", size=20000)
    with pytest.MonkeyPatch.context() as patch:  # a module fixture: no function-scoped monkeypatch
        patch.chdir(folder)
        BDHCLI(args=["fit", "--data.path", str(corpus), *TINY_ARGS, "--trainer.max_steps", "6", "--seed_everything",
                     "3", "--sample.length", "0", "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1",
                     "--trainer.val_check_interval", "2"])  # fmt: skip
    (folder / "concept.txt").write_text("the cat sat\nthe cat ran\n\n")
    (folder / "control.txt").write_text("a dog sat\na dog ran\n")
    return folder


@pytest.fixture(autouse=True)
def few_bootstrap_draws(monkeypatch):
    """50 window-bootstrap draws instead of 1,000: this file checks what the command wires together, not the
    bootstrap (test_insight_planted.py does); it halves an inspect's time."""
    from functools import partial

    from bdh_lightning.insight import activations

    monkeypatch.setattr(activations, "loss_correlation", partial(activations.loss_correlation, draws=50))


SMALL = dict(data=DataOptions(windows=2, block_size=32), graph=GraphOptions(seeds=1, hubs=2),
             neurons=NeuronOptions(top=2, contexts=2, width=8))  # fmt: skip
FIGURES = ("degrees.png", "firing_rates.png", "sparsity_layers.png", "active_vs_loss.png", "graph_heatmap.png")


def test_inspect_of_one_checkpoint_writes_every_look_beside_the_init_model(trained, tmp_path, capsys, monkeypatch):
    drawn = {}
    for name in ("plot_degrees", "plot_firing_rates", "plot_sparsity_layers"):  # each compares trained and init

        def recorded(trained_side, init_side, name=name, real=getattr(command, name)):
            drawn[name] = (trained_side, init_side)
            return real(trained_side, init_side)

        monkeypatch.setattr(command, name, recorded)
    real_heatmap = command.plot_graph_heatmap
    monkeypatch.setattr(
        command, "plot_graph_heatmap", lambda model, whole: drawn.update(heatmap=whole) or real_heatmap(model, whole)
    )
    last = trained / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    probe = ProbeOptions(concept=str(trained / "concept.txt"), control=str(trained / "control.txt"), top=2,
                         permutations=5)  # fmt: skip
    # A threshold: each head keeps its own number of edges, which the model at initialisation must then match.
    graph = GraphOptions(seeds=1, hubs=2, threshold=0.005)
    started = time.perf_counter()
    assert inspect_command(str(last), str(tmp_path / "report"), probe=probe, **{**SMALL, "graph": graph}) == 0
    elapsed = time.perf_counter() - started
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] == str(last) and report["step"] == 6 and report["seed"] == 3  # the run's seed
    assert report["model"] == {**BDHConfig(**TINY_MODEL).architecture(), "neurons_per_head": 128}
    assert report["data"] == {"path": str(trained / "corpus.txt"), "windows": 2, "block_size": 32,
                              "from_byte": 18000, "corpus_bytes": 20000}  # fmt: skip
    assert report["options"]["graph"] == {**graph.__dict__} and report["options"]["probe"]["top"] == 2
    assert report["options"]["neurons"] == {**SMALL["neurons"].__dict__}
    trained_edges = [head["edges"] for head in report["graph"]["trained"]["heads"]]
    assert [head["edges"] for head in report["graph"]["init"]["heads"]] == trained_edges != [5 * 128] * 2
    for side in ("trained", "init"):  # the options given reach both graphs
        assert len(report["graph"][side]["out_degree"]["hubs"]) == 2, side
    assert [w["path"] for w in report["whole_graph"]["init"]] == ["encoder", "encoder_v"]
    assert [w["path"] for w in report["whole_graph"]["trained"]] == ["encoder", "encoder_v"]
    assert [w["edges"] for w in report["whole_graph"]["init"]] == [w["edges"] for w in report["whole_graph"]["trained"]]
    assert report["whole_graph"]["init"][0]["null_modularity"] is None  # its own random baseline: no null draws
    assert (
        len(report["sparsity"]["trained"]["selective"]["neurons"]) == 2
        and report["sparsity"]["trained"] != report["sparsity"]["init"]
    )
    for side in ("trained", "init"):
        assert len(report["probe"][side]["neurons"]) == 2 and report["probe"][side]["concept_sentences"] == 2
        assert report["probe"][side]["permutations"] == report["synapses"][side]["permutations"] == 5
        assert len(report["synapses"][side]["synapses"]) == 2 and len(report["probe"][side]["ranked"]) == 2
    for neuron in report["probe"]["trained"]["neurons"]:  # each probed neuron's strongest contexts, 8 bytes wide
        assert isinstance(neuron["contexts"], list) and all(len(c["before"]) <= 8 for c in neuron["contexts"])
    assert 0 < report["seconds"] <= elapsed and "_model" not in report
    for name, section, key in (("plot_degrees", "graph", "modularity"), ("plot_firing_rates", "sparsity", "active"),
                               ("plot_sparsity_layers", "sparsity", "per_layer")):  # fmt: skip
        trained_side, init_side = drawn[name]
        assert trained_side[key] == report[section]["trained"][key] and init_side[key] == report[section]["init"][key]
    assert drawn["heatmap"]["path"] == "encoder"  # the heatmap of the trained model's first whole graph
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    printed = capsys.readouterr().out
    assert "sparsity: active a" in printed and str(out) in printed


def test_inspect_of_a_run_folder_writes_one_report_per_step_and_the_trajectory(trained, tmp_path, capsys):
    out = tmp_path / "new" / "folders" / "runs"  # the folders above it are made
    assert inspect_command(str(trained / "lightning_logs"), str(out), seed=11, **SMALL) == 0
    assert sorted(p.name for p in out.iterdir()) == ["step_4", "step_6", "trajectory.json", "trajectory.png"]
    for step in (4, 6):
        report = json.loads((out / f"step_{step}" / "report.json").read_text())
        assert report["step"] == step and report["probe"] is None and report["synapses"] is None
        assert report["seed"] == 11  # the seed given, not the run's
        assert all((out / f"step_{step}" / name).is_file() for name in FIGURES)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"trajectory over 2 checkpoints -> {out / 'trajectory.png'}, {out / 'trajectory.json'}"
    assert len(lines) == 3 and all(line.startswith("sparsity: active a ") for line in lines[:2])  # each step's


def test_inspect_last_finds_the_newest_run_and_refuses_a_bad_output(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="holds other files"):
        inspect_command(output=str(tmp_path / "taken"), **SMALL)
    for bad, name in (("concept", "probe.concept"), ("control", "probe.control")):  # read before any model
        sides = {
            "concept": str(trained / "concept.txt"),
            "control": str(trained / "control.txt"),
            bad: str(tmp_path / "none.txt"),
        }
        with pytest.raises(UsageError, match=f"^{name} {tmp_path / 'none.txt'}: cannot read it"):
            inspect_command(output=str(tmp_path / "new"), probe=ProbeOptions(**sides), **SMALL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lightning_logs").symlink_to(trained / "lightning_logs")
    defaults = {**SMALL, "data": DataOptions(block_size=32)}  # windows: the default for this (tiny) model, 16
    assert inspect_command(**defaults) == 0  # --ckpt_path last, --output inspect: the defaults
    report = json.loads((tmp_path / "inspect" / "report.json").read_text())
    assert report["step"] == 6 and report["data"]["windows"] == 16


def test_a_report_that_cannot_be_written_is_one_line_naming_the_output(trained, tmp_path, monkeypatch):
    last = trained / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    (tmp_path / "file.txt").write_text("x")
    under_a_file = tmp_path / "file.txt" / "sub" / "out"
    with pytest.raises(ResourceError) as error:
        inspect_command(str(last), str(under_a_file), **SMALL)
    assert str(error.value) == f"cannot write --output {under_a_file} (Not a directory); nothing was written"

    def full_disk(report, out, figures):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(command, "write_report", full_disk)
    with pytest.raises(ResourceError) as error:
        inspect_command(str(last), str(tmp_path / "report"), **SMALL)
    assert str(error.value).startswith(f"cannot write --output {tmp_path / 'report'} (No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing half-written left
