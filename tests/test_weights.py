"""Weights in and out (weights.py, export.py): every format round-trips bit for bit, the reference file loads
strictly into a module with the reference's names and gives the same logits, the HF layout key by key,
fit --model.init_from starts from exported weights, and bad files get one line."""

import dataclasses
import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS, TINY_MODEL, write_letters
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from spec_oracle import oracle_logits, oracle_rope_frequencies
from torch import nn

from bdh_lightning import __version__
from bdh_lightning import weights as weights_module
from bdh_lightning.cli import BDHCLI
from bdh_lightning.errors import CheckpointError, ResourceError, UsageError
from bdh_lightning.export import export_command
from bdh_lightning.main import main
from bdh_lightning.model import BDH, BDHConfig
from bdh_lightning.module import BDHLitModule
from bdh_lightning.weights import load_model_from_checkpoint, read_weights

OUTPUTS = {"reference": "model.pt", "safetensors": "model.safetensors", "hf": "model_hf"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real tiny `fit` of 3 steps: its folder (cwd for the CLI), last.ckpt and corpus."""
    folder = tmp_path_factory.mktemp("run")
    corpus = write_letters(folder / "corpus.txt")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        BDHCLI(args=["fit", "--data.path", str(corpus), *TINY_ARGS, "--trainer.max_steps", "3"])
    finally:
        os.chdir(cwd)
    return folder, folder / "lightning_logs/version_0/checkpoints/last.ckpt", corpus


def random_bytes(batch=2, length=40, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(path, **settings):
    with torch.inference_mode():
        return load_model_from_checkpoint(path, settings=settings or None)(random_bytes())


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message, message
    return message


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("format", ["reference", "safetensors", "hf"])
def test_each_format_round_trips_bit_exactly(run, tmp_path, format, capsys):
    _, ckpt, _ = run
    output = tmp_path / OUTPUTS[format]
    assert export_command(str(ckpt), format, str(output)) == 0
    assert "wrote" in capsys.readouterr().out
    original = read_weights(ckpt).tensors
    back = read_weights(output).tensors
    for name in ("embed.weight", "encoder", "encoder_v", "decoder", "lm_head"):
        assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name]), name
    assert torch.equal(logits(output), logits(ckpt))
    # ... and back again: the exported file is itself a source for export.
    again = tmp_path / "again.safetensors"
    export_command(str(output), "safetensors", str(again))
    assert torch.equal(logits(again), logits(ckpt))


def test_bfloat16_weights_keep_their_dtype(tmp_path):
    model = BDH(BDHConfig(**TINY_MODEL)).to(torch.bfloat16)
    ckpt = tmp_path / "bf16.ckpt"
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": TINY_MODEL}, ckpt
    )
    export_command(str(ckpt), "safetensors", str(tmp_path / "bf16.safetensors"))
    back = read_weights(tmp_path / "bf16.safetensors").tensors
    assert back["encoder"].dtype == torch.bfloat16 and torch.equal(back["encoder"], model.encoder.detach())
    assert torch.equal(logits(tmp_path / "bf16.safetensors"), logits(ckpt))


def test_ckpt_path_last_resolves_to_the_newest_run(run, tmp_path):
    folder, ckpt, _ = run
    export_command("last", "safetensors", str(tmp_path / "last.safetensors"), logs_dir=str(folder / "lightning_logs"))
    assert torch.equal(logits(tmp_path / "last.safetensors"), logits(ckpt))


# ------------------------------------------------------------------------- the reference's own loading


@dataclasses.dataclass
class ReferenceConfig:
    """The reference's BDHConfig fields: the settings JSON must construct it as is."""

    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256


class ReferenceAttention(nn.Module):
    def __init__(self, N):
        super().__init__()
        self.freqs = nn.Buffer(torch.zeros(1, 1, 1, N))  # persistent: part of the reference's state_dict


class ReferenceShapedBDH(nn.Module):
    """Parameters and buffer named and shaped as the public reference's BDH (pathwaycom/bdh, bdh.py); the
    forward pass is the independent statement of the spec in spec_oracle.py."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        H, D, V = config.n_head, config.n_embd, config.vocab_size
        N = config.mlp_internal_dim_multiplier * D // H
        self.config = config
        self.decoder = nn.Parameter(torch.zeros(H * N, D))
        self.encoder = nn.Parameter(torch.zeros(H, D, N))
        self.attn = ReferenceAttention(N)
        self.embed = nn.Embedding(V, D)
        self.encoder_v = nn.Parameter(torch.zeros(H, D, N))
        self.lm_head = nn.Parameter(torch.zeros(D, V))

    def forward(self, idx):
        return oracle_logits(
            idx, self.embed.weight, self.encoder, self.encoder_v, self.decoder, self.lm_head, self.config.n_layer
        )


def test_reference_file_loads_strictly_into_the_reference_shape_and_gives_the_same_logits(run, tmp_path):
    _, ckpt, _ = run
    export_command(str(ckpt), "reference", str(tmp_path / "bdh.pt"))
    config = ReferenceConfig(**json.loads((tmp_path / "bdh.json").read_text()))
    state_dict = torch.load(tmp_path / "bdh.pt", weights_only=True)
    reference = ReferenceShapedBDH(config)
    reference.load_state_dict(state_dict, strict=True)
    N = config.mlp_internal_dim_multiplier * config.n_embd // config.n_head
    assert torch.equal(reference.attn.freqs, oracle_rope_frequencies(N).view(1, 1, 1, N))
    with torch.inference_mode():
        theirs = reference(random_bytes())
    torch.testing.assert_close(theirs, logits(ckpt), rtol=1e-5, atol=1e-5)
    # strict means strict: without the buffer the same load fails
    with pytest.raises(RuntimeError, match="attn.freqs"):
        ReferenceShapedBDH(config).load_state_dict(
            {k: v for k, v in state_dict.items() if k != "attn.freqs"}, strict=True
        )


def test_the_reference_implementation_itself(run, tmp_path, monkeypatch):
    """Runs where BDH_REFERENCE_DIR names a checkout of github.com/pathwaycom/bdh (CI has none). By hand, at
    its commit 714bc80: strict load and bit-identical logits, both ways."""
    folder = os.environ.get("BDH_REFERENCE_DIR")
    if not folder:
        pytest.skip("set BDH_REFERENCE_DIR to a checkout of pathwaycom/bdh to compare with its bdh.py")
    monkeypatch.syspath_prepend(folder)
    reference = importlib.import_module("bdh")
    _, ckpt, _ = run
    export_command(str(ckpt), "reference", str(tmp_path / "bdh.pt"))
    model = reference.BDH(reference.BDHConfig(**json.loads((tmp_path / "bdh.json").read_text()))).eval()
    model.load_state_dict(torch.load(tmp_path / "bdh.pt", weights_only=True), strict=True)
    with torch.inference_mode():
        assert torch.equal(model(random_bytes())[0], logits(ckpt))
    # the other way: the reference's own (random) weights, read by us
    fresh = reference.BDH(reference.BDHConfig(**json.loads((tmp_path / "bdh.json").read_text()))).eval()
    torch.save(fresh.state_dict(), tmp_path / "theirs.pt")
    with torch.inference_mode():
        assert torch.equal(fresh(random_bytes())[0], logits(tmp_path / "theirs.pt", n_layer=fresh.config.n_layer))


def test_a_reference_state_dict_without_settings_takes_them_from_the_caller(run, tmp_path):
    _, ckpt, _ = run
    export_command(str(ckpt), "reference", str(tmp_path / "bdh.pt"))
    (tmp_path / "bdh.json").unlink()
    with pytest.raises(CheckpointError) as error:
        logits(tmp_path / "bdh.pt")
    assert "how many layers" in one_line(error) and "bdh.json" in str(error.value)
    # n_layer is enough: the other settings are the encoder's shape
    assert torch.equal(logits(tmp_path / "bdh.pt", n_layer=2), logits(ckpt))
    # a compiled reference model saves its weights under _orig_mod.
    compiled = {f"_orig_mod.{k}": v for k, v in torch.load(tmp_path / "bdh.pt", weights_only=True).items()}
    torch.save({"model": compiled, "step": 9}, tmp_path / "train_script.pt")
    assert torch.equal(logits(tmp_path / "train_script.pt", n_layer=2), logits(ckpt))
    assert read_weights(tmp_path / "train_script.pt").step == 9
    # The generate command takes it from a flag.
    from bdh_lightning.main import main

    args = ["generate", "--ckpt_path", str(tmp_path / "bdh.pt"), "--max_new_tokens", "3", "--temperature", "0"]
    assert main(args) == 2  # how many layers? one line
    assert main([*args, "--n_layer", "2"]) == 0


def test_given_settings_override_the_file(run, tmp_path):
    _, ckpt, _ = run
    export_command(str(ckpt), "safetensors", str(tmp_path / "m.safetensors"))
    assert load_model_from_checkpoint(tmp_path / "m.safetensors", settings={"n_layer": 3}).config.n_layer == 3
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(tmp_path / "m.safetensors", settings={"n_embd": 64})
    assert "encoder is (2, 32, 128) but (2, 64, 256)" in one_line(error)


# -------------------------------------------------------------------------------- safetensors and hf


def test_safetensors_metadata_holds_settings_step_and_version(run, tmp_path):
    _, ckpt, _ = run
    export_command(str(ckpt), "safetensors", str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:16]  # not a torch zip or a pickle
    with safe_open(tmp_path / "m.safetensors", framework="pt") as file:
        metadata = file.metadata()
        assert sorted(file.keys()) == ["decoder", "embed.weight", "encoder", "encoder_v", "lm_head"]
    assert json.loads(metadata["bdh_lightning.settings"]) == {**TINY_MODEL, "dropout": 0.1, "vocab_size": 256}
    assert metadata["bdh_lightning.step"] == "3" and metadata["bdh_lightning.version"] == __version__
    assert metadata["format"] == "pt"


def test_hf_layout_key_by_key(run, tmp_path):
    _, ckpt, _ = run
    export_command(str(ckpt), "hf", str(tmp_path / "hf"))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == "bdh" and config["architectures"] == ["BDHForCausalLM"]
    expected = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "mlp_internal_dim_multiplier": 8,
                "dropout": 0.1, "vocab_size": 256, "tie_word_embeddings": False, "torch_dtype": "float32"}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    ours = read_weights(ckpt).tensors
    with safe_open(tmp_path / "hf/model.safetensors", framework="pt") as file:
        assert file.metadata() == {"format": "pt"}
        hf = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    assert sorted(hf) == [
        "backbone.decoder",
        "backbone.embed.weight",
        "backbone.encoder",
        "backbone.encoder_v",
        "lm_head.weight",
    ]
    for name in ("decoder", "embed.weight", "encoder", "encoder_v"):
        assert torch.equal(hf[f"backbone.{name}"], ours[name]), name
    assert hf["lm_head.weight"].shape == (256, 32) and torch.equal(hf["lm_head.weight"], ours["lm_head"].t())


def test_hf_folder_with_tied_embeddings_reads_lm_head_from_the_embedding(tmp_path):
    model = BDH(BDHConfig(**TINY_MODEL))
    folder = tmp_path / "tied"
    folder.mkdir()
    settings = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "mlp_internal_dim_multiplier": 8}
    (folder / "config.json").write_text(json.dumps({"model_type": "bdh", **settings}))
    tensors = {f"backbone.{n}": getattr(model, n).detach() for n in ("encoder", "encoder_v", "decoder")}
    save_file({**tensors, "backbone.embed.weight": model.embed.weight.detach()}, folder / "model.safetensors")
    loaded = load_model_from_checkpoint(folder)
    assert torch.equal(loaded.lm_head, model.embed.weight.t())


def test_hf_export_gives_the_same_logits_under_the_port(run, tmp_path):
    """Runs only where transformers and the port (github.com/jploski/bdh-transformers, not on PyPI) are
    installed; CI has neither. By hand, with transformers 4.57.6 and the port at ddda0dc: bit-identical."""
    pytest.importorskip("transformers")
    pytest.importorskip("bdh_transformers")  # registers model_type "bdh" with the Auto classes
    from transformers import AutoModelForCausalLM

    _, ckpt, _ = run
    export_command(str(ckpt), "hf", str(tmp_path / "hf"))
    idx = random_bytes()  # raw byte ids: the port's ByT5 tokenizer would shift them by 3
    for implementation in ("bdh_parallel", "bdh_recurrent"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation=implementation).eval()
        with torch.inference_mode():
            theirs = model(input_ids=idx, use_cache=False).logits
        assert torch.equal(theirs, logits(ckpt)), implementation


# -------------------------------------------------------------------------------------- fine-tuning


def test_fit_init_from_starts_from_the_exported_weights_with_a_fresh_optimizer(run, tmp_path, monkeypatch):
    folder, ckpt, corpus = run
    export_command(str(ckpt), "safetensors", str(tmp_path / "start.safetensors"))
    monkeypatch.chdir(tmp_path)
    args = [
        "--data.path",
        str(corpus),
        *TINY_ARGS,
        "--trainer.max_steps",
        "2",
        "--model.init_from",
        str(tmp_path / "start.safetensors"),
    ]
    cli = BDHCLI(args=args, run=False)  # the real command line, parsed and built; fit run below
    for name, value in read_weights(ckpt).tensors.items():
        assert torch.equal(cli.model.model.state_dict()[name], value), name
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = torch.load(Path(cli.trainer.log_dir) / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # a new run, not the old one's step 3 + 2
    assert all(state["step"] == 2 for state in saved["optimizer_states"][0]["state"].values())  # a fresh AdamW
    # the new run's checkpoint stands alone: loading it needs (and reads) nothing of the file it started from
    assert "init_from" not in saved["hyper_parameters"]
    assert "start.safetensors" in (Path(cli.trainer.log_dir) / "config.yaml").read_text()  # provenance kept here
    (tmp_path / "start.safetensors").unlink()
    reloaded = BDHLitModule.load_from_checkpoint(Path(cli.trainer.log_dir) / "checkpoints/last.ckpt")
    assert torch.equal(reloaded.model.encoder, saved["state_dict"]["model.encoder"])
    # starting from a reference state_dict or another run's checkpoint works the same way
    export_command(str(ckpt), "reference", str(tmp_path / "start.pt"))
    for source in (tmp_path / "start.pt", ckpt):
        module = BDHLitModule(**TINY_MODEL, init_from=str(source))
        for name, value in read_weights(ckpt).tensors.items():
            assert torch.equal(module.model.state_dict()[name], value), (source, name)


def test_validate_init_from_an_export_equals_validate_of_the_checkpoint(run, tmp_path, monkeypatch):
    folder, ckpt, corpus = run
    export_command(str(ckpt), "hf", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    common = ["validate", "--data.path", str(corpus), *TINY_ARGS]
    of_checkpoint = BDHCLI(args=[*common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics["val/loss"]
    of_export = BDHCLI(args=[*common, "--model.init_from", str(tmp_path / "hf")]).trainer.callback_metrics["val/loss"]
    assert torch.equal(of_export, of_checkpoint)
    # --ckpt_path takes an export too: validate scores its weights; fit says to start from them instead.
    export_command(str(ckpt), "safetensors", str(tmp_path / "w.safetensors"))
    direct = BDHCLI(args=[*common, "--ckpt_path", str(tmp_path / "w.safetensors")]).trainer.callback_metrics["val/loss"]
    assert torch.equal(direct, of_checkpoint)
    from bdh_lightning.main import main

    assert main(["fit", "--data.path", str(corpus), *TINY_ARGS, "--ckpt_path", str(tmp_path / "w.safetensors")]) == 2


def test_init_from_weights_of_other_settings_is_one_line(run, tmp_path):
    _, ckpt, _ = run
    with pytest.raises(CheckpointError) as error:
        BDHLitModule(**{**TINY_MODEL, "n_embd": 64}, init_from=str(ckpt))
    assert "n_embd=32 there, not n_embd=64" in one_line(error)
    assert "--model.n_embd 32 --model.n_head 2 --model.mlp_internal_dim_multiplier 8" in str(error.value)
    with pytest.raises(CheckpointError) as error:
        BDHLitModule(**TINY_MODEL, init_from=str(tmp_path / "moved.safetensors"))
    assert "--model.init_from" in one_line(error) and "no such file or folder" in str(error.value)


def test_init_from_with_another_depth_says_so(run, capsys):
    _, ckpt, _ = run
    BDHLitModule(**{**TINY_MODEL, "n_layer": 4}, init_from=str(ckpt))
    assert "trained with n_layer=2; this model applies its layer 4 times" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- bad input


def reference_file(tmp_path, change=lambda sd: sd, name="bad.pt"):
    model = BDH(BDHConfig(**TINY_MODEL))
    N = model.config.neurons_per_head
    state_dict = {
        **{k: v.detach().clone() for k, v in model.state_dict().items()},
        "attn.freqs": oracle_rope_frequencies(N).view(1, 1, 1, N),
    }
    torch.save(change(state_dict), tmp_path / name)
    (tmp_path / name).with_suffix(".json").write_text(json.dumps({**TINY_MODEL, "dropout": 0.0, "vocab_size": 256}))
    return tmp_path / name


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def poisoned(sd, name, value):
    sd[name][1, 2] = value
    return sd


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "decoder"}, "does not hold BDH's weights: missing decoder"),
        (lambda sd: {**sd, "lm_gate": torch.zeros(32, 1)}, "unexpected lm_gate"),
        (lambda sd: {**sd, "encoder": torch.zeros(2, 32, 64)}, "encoder is (2, 32, 64) but (2, 32, 128)"),
        (lambda sd: poisoned(sd, "decoder", float("nan")), "decoder has 1 non-finite values"),
        (lambda sd: poisoned(sd, "embed.weight", float("inf")), "embed.weight has 1 non-finite values"),
        (lambda sd: {**sd, "attn.freqs": sd["attn.freqs"] * 2}, "attn.freqs is not BDH's rotary frequencies"),
        (lambda sd: {**sd, "encoder": sd["encoder"].to(torch.int32)}, "encoder is torch.int32, not floating point"),
        (lambda sd: [1, 2, 3], "holds a list, not a state_dict"),
        (lambda sd: {**sd, "step": 3}, "'step' is not a tensor"),
    ],
    ids=["missing-key", "extra-key", "shape", "nan", "inf", "freqs", "integer", "not-a-dict", "not-a-state-dict"],
)
def test_bad_weights_get_one_line(tmp_path, change, message):
    path = reference_file(tmp_path, change)
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    assert message in one_line(error)
    with pytest.raises(CheckpointError):  # export refuses them too, and writes nothing
        export_command(str(path), "safetensors", str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_settings_that_do_not_fit_the_shapes_are_one_line(tmp_path):
    path = reference_file(tmp_path)
    path.with_suffix(".json").write_text(json.dumps({**TINY_MODEL, "n_head": 4}))
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    assert (
        "encoder is (2, 32, 128) but (4, 32, 64) with the model settings (n_layer=2, n_embd=32, n_head=4"
        in one_line(error)
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({**TINY_MODEL, "n_embd": 0}, "unusable model settings: model.n_embd must be a positive integer, got 0"),
        ({**TINY_MODEL, "n_head": "two"}, "model.n_head must be a positive integer, got 'two'"),
        ([2, 32], "is not a JSON object of model settings"),
    ],
)
def test_unusable_settings_beside_a_state_dict_are_one_line(tmp_path, settings, message):
    path = reference_file(tmp_path)
    path.with_suffix(".json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    assert message in one_line(error)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"encoder": Payload(marker)}, tmp_path / "payload.pt")
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(tmp_path / "payload.pt", settings={"n_layer": 2})
    assert "pickled reference to" in one_line(error) and "payload.pt" in str(error.value)
    with pytest.raises(CheckpointError):
        BDHLitModule(**TINY_MODEL, init_from=str(tmp_path / "payload.pt"))
    assert not marker.exists()


def test_a_safetensors_file_of_another_model_is_one_line(tmp_path):
    save_file({"transformer.h.0.attn.c_attn.weight": torch.randn(4, 4), "transformer.wte.weight": torch.randn(8, 4)},
              tmp_path / "gpt2.safetensors")  # fmt: skip
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(tmp_path / "gpt2.safetensors", settings={"n_layer": 2})
    assert "holds the weights of another model (transformer.h.0.attn.c_attn.weight" in one_line(error)
    (tmp_path / "other_hf").mkdir()
    (tmp_path / "other_hf/config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(tmp_path / "other_hf")
    assert "of type 'llama', not 'bdh'" in one_line(error)


@pytest.mark.parametrize("content", [b"\x00garbage" * 100, b"", b"not weights\n"], ids=["garbage", "empty", "text"])
def test_files_that_are_not_weights_are_one_line(tmp_path, content):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(tmp_path / "x.safetensors")
    assert "x.safetensors" in one_line(error)


def test_an_existing_output_is_never_overwritten_without_overwrite(run, tmp_path):
    _, ckpt, _ = run
    for format, name in OUTPUTS.items():
        (tmp_path / name).mkdir() if format == "hf" else (tmp_path / name).write_bytes(b"keep me")
        with pytest.raises(UsageError) as error:
            export_command(str(ckpt), format, str(tmp_path / name))
        assert "exists; give --overwrite" in one_line(error)
    assert (tmp_path / "model.pt").read_bytes() == b"keep me" and not (tmp_path / "model.json").exists()
    (tmp_path / "model.pt").unlink()
    (tmp_path / "model.json").write_text("{}")  # the settings file beside counts too
    with pytest.raises(UsageError, match="model.json exists"):
        export_command(str(ckpt), "reference", str(tmp_path / "model.pt"))
    for format, name in OUTPUTS.items():
        export_command(str(ckpt), format, str(tmp_path / name), overwrite=True)
        assert torch.equal(logits(tmp_path / name), logits(ckpt))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_bad_output_and_missing_source_are_one_line(run, tmp_path):
    _, ckpt, _ = run
    with pytest.raises(UsageError) as error:
        export_command(str(ckpt), "safetensors", str(tmp_path / "no/such/folder/m.safetensors"))
    assert "does not exist" in one_line(error)
    with pytest.raises(UsageError) as error:
        export_command(str(ckpt), "reference", str(tmp_path / "settings.json"))
    assert "not ending in .json" in one_line(error)
    with pytest.raises(CheckpointError) as error:
        export_command(str(tmp_path / "missing.ckpt"), "hf", str(tmp_path / "hf"))
    assert "not found" in one_line(error)
    assert not (tmp_path / "hf").exists()


def test_the_export_command_line(run, tmp_path, capsys):
    folder, ckpt, _ = run
    logs = ["--logs_dir", str(folder / "lightning_logs")]
    output = str(tmp_path / "cli.safetensors")
    assert main(["export", "--ckpt_path", "last", *logs, "--format", "safetensors", "--output", output]) == 0
    assert "wrote" in capsys.readouterr().out and torch.equal(logits(output), logits(ckpt))
    assert main(["export", "--ckpt_path", str(ckpt), "--format", "safetensors", "--output", output]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite true" in err, err
    args = ["export", "--ckpt_path", str(ckpt), "--format", "safetensors", "--output", output, "--overwrite", "true"]
    assert main(args) == 0
    assert main(["export", "--ckpt_path", str(ckpt), "--format", "onnx", "--output", output]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "onnx" in err, err


@pytest.mark.parametrize("format", ["reference", "safetensors", "hf"])
def test_a_full_disk_is_one_line_and_keeps_the_old_output(run, tmp_path, monkeypatch, format):
    """Simulated: each writer starts its file, then fails as it does when the disk fills (checked by hand on a
    64 kB tmpfs: safetensors raises SafetensorError, torch.save RuntimeError)."""
    _, ckpt, _ = run
    output = tmp_path / OUTPUTS[format]
    export_command(str(ckpt), format, str(output))
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full_safetensors(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_torch_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 33984 vs 33872")

    monkeypatch.setattr(weights_module, "save_file", full_safetensors)
    monkeypatch.setattr(weights_module.torch, "save", full_torch_save)
    monkeypatch.setattr(weights_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(ResourceError) as error:
        export_command(str(ckpt), format, str(output), overwrite=True)
    assert "no space left on the device" in one_line(error)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # old output whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporaries removed
