"""Weights in and out (weights.py, export.py): every format round-trips bit for bit, the reference file loads
strictly into a module with the reference's names and gives the same logits, the HF layout key by key,
fit --model.init_from starts from exported weights, and bad files get one line."""

import dataclasses
import importlib
import json
import os
import re
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
    with pytest.MonkeyPatch.context() as patch:  # a module fixture: no function-scoped monkeypatch
        patch.chdir(folder)
        BDHCLI(args=["fit", "--data.path", str(corpus), *TINY_ARGS, "--trainer.max_steps", "3"])
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


def test_export_says_what_it_wrote_word_for_word(run, tmp_path, monkeypatch, capsys):
    """Catches the closing line's files, format, count, dtype or step mangled, a step claimed for weights that have
    none, and another default folder for `--ckpt_path last` than lightning_logs."""
    folder, ckpt, _ = run
    monkeypatch.chdir(folder)  # `last` with the default logs_dir: ./lightning_logs
    count = f"{BDHConfig(**TINY_MODEL).num_parameters:,}"
    export_command("last", "reference", str(tmp_path / "bdh.pt"))
    assert capsys.readouterr().out == (
        f"wrote {tmp_path / 'bdh.pt'} and {tmp_path / 'bdh.json'} (reference: {count} parameters, float32, step 3) "
        f"from {Path('lightning_logs/version_0/checkpoints/last.ckpt')}\n"
    )
    export_command(str(tmp_path / "bdh.pt"), "safetensors", str(tmp_path / "m.safetensors"))  # a state_dict: no step
    assert capsys.readouterr().out == (
        f"wrote {tmp_path / 'm.safetensors'} (safetensors: {count} parameters, float32) from {tmp_path / 'bdh.pt'}\n"
    )


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


# ------------------------------------------------------------------ each reader and writer, word for word
# In-process and without a fit: random weights of a tiny model, written by hand in each layout. Each test names the
# mistake it catches (benchmarks/mutation.py weights).


@pytest.fixture(scope="module")
def tiny():
    """A tiny model's settings and its five random (normal, never zero) weights under BDH's names."""
    config = BDHConfig(**TINY_MODEL)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = BDH(config)
    return config, {name: value.detach().clone() for name, value in model.state_dict().items()}


def hf_names(tensors, lm_head=True):
    """Our tensors under bdh-transformers' names (lm_head.weight transposed), as that port stores them."""
    hf = {f"backbone.{name}": tensors[name] for name in ("embed.weight", "encoder", "encoder_v", "decoder")}
    return {**hf, "lm_head.weight": tensors["lm_head"].t().contiguous()} if lm_head else hf


def hf_folder(folder, tensors, **config):
    folder.mkdir()
    settings = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "mlp_internal_dim_multiplier": 8}
    (folder / "config.json").write_text(json.dumps({"model_type": "bdh", **settings, **config}))
    save_file(tensors, folder / "model.safetensors")
    return folder


def same_tensors(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def error_of(call, *args, error=CheckpointError, **kwargs) -> str:
    with pytest.raises(error) as raised:
        call(*args, **kwargs)
    return one_line(raised)


def test_check_weights_names_every_missing_and_unexpected_name_word_for_word(tiny):
    """Catches names joined wrongly, more than five unexpected names listed, the two lists run together."""
    config, tensors = tiny
    check = weights_module.check_weights
    without = {k: v for k, v in tensors.items() if k not in ("decoder", "encoder_v")}
    assert error_of(check, without, config, "w.pt") == "w.pt does not hold BDH's weights: missing encoder_v, decoder"
    extra = {**tensors, **{f"x{i}": tensors["decoder"] for i in range(6, 0, -1)}}
    assert error_of(check, extra, config, "w.pt") == "w.pt does not hold BDH's weights: unexpected x1, x2, x3, x4, x5"
    renamed = {**without, "encoder_v2": tensors["encoder_v"]}
    assert (
        error_of(check, renamed, config, "w.pt")
        == "w.pt does not hold BDH's weights: missing encoder_v, decoder; unexpected encoder_v2"
    )
    freqs = {**tensors, "attn.freqs": oracle_rope_frequencies(128) * 2}
    assert error_of(check, freqs, config, "w.pt") == (
        "w.pt: attn.freqs is not BDH's rotary frequencies (theta 2^16, N=128); the weights are of a modified model"
    )
    right = {**tensors, "attn.freqs": oracle_rope_frequencies(128).view(1, 1, 1, 128)}
    assert same_tensors(check(right, config, "w.pt"), tensors)  # the buffer checked, then left out


def test_export_paths_refusals_word_for_word(tmp_path):
    """Catches the list of formats or the reference's .json wording mangled."""
    assert (
        error_of(weights_module.export_paths, "onnx", tmp_path / "m", False, error=UsageError)
        == "--format must be one of reference, safetensors, hf, got 'onnx'"
    )
    assert error_of(weights_module.export_paths, "reference", tmp_path / "m.json", False, error=UsageError) == (
        f"--output {tmp_path / 'm.json'}: the reference state_dict needs a name not ending in .json "
        "(its settings go to <name>.json)"
    )


def test_hf_names_become_ours_and_unknown_names_are_kept(tiny):
    """Catches the port's rotary buffer not renamed, or an unknown name dropped or turned into None."""
    _, tensors = tiny
    freqs = oracle_rope_frequencies(128).view(1, 1, 1, 128)
    hf = {**hf_names(tensors), "backbone.attn.freqs": freqs, "backbone.gate": tensors["decoder"]}
    ours = weights_module.from_hf_names(hf, Path("m.safetensors"), tied=False)
    assert same_tensors(ours, {**tensors, "attn.freqs": freqs, "backbone.gate": tensors["decoder"]})
    tied = weights_module.from_hf_names(hf_names(tensors, lm_head=False), Path("m.safetensors"), tied=True)
    assert same_tensors(tied, {**tensors, "lm_head": tensors["embed.weight"].t()})


@pytest.mark.parametrize(
    "head, size, expected",
    [
        (b"\x02" + bytes(7) + b"{}", 10, True),  # a header that ends the file exactly
        (b"\x02" + bytes(7) + b"{}", 9, False),  # ... one byte short: truncated
        (b"\x02" + bytes(7) + b"{", 9, False),
        (b"\xe8\x03" + bytes(6) + b"{", 500, False),  # a header of 1000 bytes in a file of 500
        (b"\xff" * 8 + b"{", 10**6, False),  # a length past 2^63: unsigned, not -1
        (b"\x02" + bytes(7) + b"[]", 100, False),  # not a JSON object
        (b"\x02" + bytes(7), 100, False),  # eight bytes: too short to tell
        (b"", 0, False),
    ],
)
def test_the_safetensors_header_check(head, size, expected):
    """Catches the length read signed or off by one, the `{` check dropped, a short head taken for safetensors."""
    assert weights_module.is_safetensors_header(head, size) is expected


def test_a_whole_safetensors_file_passes_the_header_check(tiny, tmp_path):
    """Catches the check looking past the first 9 bytes of a longer head, or a header cut short taken as whole."""
    _, tensors = tiny
    save_file(tensors, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    assert weights_module.is_safetensors_header(data, len(data))  # the head may be longer than 9 bytes
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert weights_module.is_safetensors_header(data, header_end)
    assert not weights_module.is_safetensors_header(data, header_end - 1)  # a file cut inside its header


def test_load_model_from_checkpoint_puts_it_on_the_device_asked_for(tiny, tmp_path):
    """Catches the device argument ignored (the meta device needs no GPU)."""
    config, tensors = tiny
    weights_module.write_weights(tensors, config, "safetensors", tmp_path / "m.safetensors")
    assert load_model_from_checkpoint(tmp_path / "m.safetensors", device="meta").encoder.is_meta


# ---------------------------------------------------------------------------------------- reading, per format


def test_an_hf_folder_reads_as_what_it_holds(tiny, tmp_path):
    """Catches the folder, kind or settings of an HF read lost, its stored lm_head replaced by the embedding."""
    _, tensors = tiny
    folder = hf_folder(tmp_path / "hf", hf_names(tensors), dropout=0.0)  # tie_word_embeddings not said: True
    weights = read_weights(folder)
    assert (weights.path, weights.kind, weights.step) == (folder, "hf", None)
    assert weights.settings == {**TINY_MODEL, "dropout": 0.0}
    assert same_tensors(weights.tensors, tensors)


def test_an_hf_folder_that_unties_lm_head_must_store_it(tiny, tmp_path):
    """Catches tie_word_embeddings: false not read (lm_head silently taken from the embedding)."""
    config, tensors = tiny
    folder = hf_folder(tmp_path / "hf", hf_names(tensors, lm_head=False), tie_word_embeddings=False)
    message = error_of(weights_module.load_weights, folder)
    assert message == f"{folder} does not hold BDH's weights: missing lm_head"


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("[1, 2]", "{folder} holds a Hugging Face model of type None, not 'bdh' (bdh-transformers)"),
        ('{"model_type": "gpt2"}', "{folder} holds a Hugging Face model of type 'gpt2', not 'bdh' (bdh-transformers)"),
        ("{", "cannot read {folder}/config.json: Expecting property name enclosed in double quotes: line 1 column 2 "
         "(char 1)"),
    ],
)  # fmt: skip
def test_an_hf_config_that_is_not_bdh_is_one_line(tmp_path, config_text, message):
    """Catches a config.json that is not an object crashing the type check, its path or reason mangled."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config_text)
    assert error_of(read_weights, folder) == message.format(folder=folder)


def test_an_hf_folder_without_its_weights_says_whether_it_is_sharded(tmp_path):
    """Catches the sharded hint given always, never, or worded wrongly."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bdh"}')
    assert error_of(read_weights, folder) == (
        f"{folder} has no model.safetensors; give a folder written by `export --format hf`"
    )
    (folder / "model.safetensors.index.json").write_text("{}")
    assert error_of(read_weights, folder) == (
        f"{folder} has no model.safetensors (sharded checkpoints are not supported); give a folder written by "
        "`export --format hf`"
    )


def test_an_unreadable_hf_weights_file_names_it_and_the_reason(tmp_path):
    """Catches the reader's reason dropped or re-joined, or a suffix added to the HF folder's message."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bdh"}')
    (folder / "model.safetensors").write_bytes(b"\x05" + bytes(7) + b'{"a":')
    message = error_of(read_weights, folder)
    # the reason is safetensors' own words (they vary between its versions): here, one line after this prefix
    assert re.fullmatch(
        re.escape(f"{folder}/model.safetensors is not a readable safetensors file (Error while deserializing header: ")
        + r"\S[^()]*\S\)",
        message,
    ), message


@pytest.mark.parametrize("layout", ["hf", "safetensors"])
def test_an_hf_lm_head_of_the_wrong_rank_names_the_file(tiny, tmp_path, layout):
    """Catches the file or the shape left out of the message (HF folder and bare safetensors alike)."""
    _, tensors = tiny
    hf = {**hf_names(tensors), "lm_head.weight": tensors["lm_head"].t().reshape(256, 32, 1).contiguous()}
    if layout == "hf":
        path = hf_folder(tmp_path / "hf", hf) / "model.safetensors"
        source = tmp_path / "hf"
    else:
        save_file(hf, tmp_path / "m.safetensors")
        path = source = tmp_path / "m.safetensors"
    assert error_of(read_weights, source) == (
        f"{path}: lm_head.weight has shape (256, 32, 1), expected (vocab_size, hidden_size)"
    )


def test_a_safetensors_file_reads_as_what_it_holds(tiny, tmp_path):
    """Catches the path, kind, settings or step of a safetensors read lost."""
    config, tensors = tiny
    weights_module.write_weights(tensors, config, "safetensors", tmp_path / "m.safetensors", step=7)
    weights = read_weights(tmp_path / "m.safetensors")
    assert (weights.path, weights.kind, weights.step) == (tmp_path / "m.safetensors", "safetensors", 7)
    assert weights.settings == config.architecture() and same_tensors(weights.tensors, tensors)


def test_a_bare_safetensors_file_of_hf_names_is_renamed_and_not_tied(tiny, tmp_path):
    """Catches a bdh-transformers file not recognised by its backbone. prefix, or its missing lm_head tied."""
    _, tensors = tiny
    save_file(hf_names(tensors), tmp_path / "hf.safetensors")
    assert same_tensors(read_weights(tmp_path / "hf.safetensors").tensors, tensors)
    save_file(hf_names(tensors, lm_head=False), tmp_path / "untied.safetensors")
    assert sorted(read_weights(tmp_path / "untied.safetensors").tensors) == sorted(set(tensors) - {"lm_head"})


@pytest.mark.parametrize(
    "metadata, settings",
    [({"bdh_lightning.settings": '["n_layer", 2]'}, {}), ({"bdh_lightning.settings": '{"n_layer": 3, "x": 1}'},
     {"n_layer": 3})],
)  # fmt: skip
def test_safetensors_settings_that_are_not_an_object_are_ignored(tiny, tmp_path, metadata, settings):
    """Catches a JSON list of settings read as if it were an object."""
    _, tensors = tiny
    save_file(tensors, tmp_path / "m.safetensors", metadata)
    assert read_weights(tmp_path / "m.safetensors").settings == settings


@pytest.mark.parametrize(
    "metadata", [{"bdh_lightning.settings": "{n_layer"}, {"bdh_lightning.step": "seven"}], ids=["settings", "step"]
)
def test_safetensors_metadata_that_is_not_valid_is_one_line(tiny, tmp_path, metadata):
    """Catches the message about bad metadata lost."""
    _, tensors = tiny
    save_file(tensors, tmp_path / "m.safetensors", metadata)
    assert error_of(read_weights, tmp_path / "m.safetensors") == (
        f"{tmp_path / 'm.safetensors'}: its bdh_lightning.* metadata is not valid; give the model settings explicitly"
    )


def test_a_safetensors_file_of_another_model_lists_three_of_its_names(tmp_path):
    """Catches the names joined wrongly or more than three listed."""
    save_file({f"h.{i}.weight": torch.randn(2, 2) for i in range(5)}, tmp_path / "other.safetensors")
    assert error_of(read_weights, tmp_path / "other.safetensors") == (
        f"{tmp_path / 'other.safetensors'} holds the weights of another model (h.0.weight, h.1.weight, h.2.weight...), "
        "not BDH's embed.weight, encoder, encoder_v, decoder, lm_head"
    )


def test_a_corrupt_safetensors_file_says_to_use_another(tmp_path):
    """Catches the advice at the end of the message lost or mangled."""
    (tmp_path / "m.safetensors").write_bytes(b"\x05" + bytes(7) + b'{"a":')
    message = error_of(read_weights, tmp_path / "m.safetensors")
    assert message.startswith(f"{tmp_path / 'm.safetensors'} is not a readable safetensors file (Error while ")
    assert message.endswith("); use another one"), message


def lightning_file(path, state_dict, **content):
    torch.save({"state_dict": state_dict, **content}, path)
    return path


def test_a_lightning_checkpoint_reads_as_what_it_holds(tiny, tmp_path):
    """Catches the path, kind, settings or step of a Lightning read lost, compiled names left unstripped."""
    _, tensors = tiny
    compiled = {f"model._orig_mod.{k}": v for k, v in tensors.items()}
    hparams = {**TINY_MODEL, "learning_rate": 0.1}
    path = lightning_file(tmp_path / "c.ckpt", {**compiled, "loss_scale": torch.ones(1)}, hyper_parameters=hparams,
                          global_step=12)  # fmt: skip
    weights = read_weights(path)
    assert (weights.path, weights.kind, weights.step, weights.settings) == (path, "lightning", 12, TINY_MODEL)
    assert same_tensors(weights.tensors, tensors)
    bare = read_weights(lightning_file(tmp_path / "bare.ckpt", compiled, global_step=True))
    assert (bare.settings, bare.step) == ({}, None)  # no hyper_parameters; a bool is no step


def test_a_training_script_checkpoint_reads_its_step_from_iter_num(tiny, tmp_path):
    """Catches nanoGPT's iter_num not read when there is no step."""
    _, tensors = tiny
    torch.save({"model": tensors, "iter_num": 40}, tmp_path / "ckpt.pt")
    weights = read_weights(tmp_path / "ckpt.pt")
    assert (weights.kind, weights.step, weights.settings) == ("reference", 40, {})
    torch.save({"model": tensors, "step": 3, "iter_num": 40}, tmp_path / "ckpt.pt")
    assert read_weights(tmp_path / "ckpt.pt").step == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {"encoder": torch.ones(2)}}, "{path} holds no BDH weights (no model.* keys); is it a checkpoint "
         "of this project?"),
        ([1, 2], "{path} holds a list, not a state_dict or checkpoint; use a file written by `fit` or `export`"),
        ({"encoder": torch.ones(2), "note": "x"}, "{path} is neither a Lightning checkpoint nor a state_dict ('note' is "
         "not a tensor); use a file written by `fit` or `export`"),
    ],
    ids=["no-model-keys", "list", "not-a-tensor"],
)  # fmt: skip
def test_torch_files_that_hold_no_weights_word_for_word(tmp_path, content, message):
    """Catches each refusal's advice mangled or lost."""
    torch.save(content, tmp_path / "x.pt")
    assert error_of(read_weights, tmp_path / "x.pt") == message.format(path=tmp_path / "x.pt")


def test_a_folder_without_config_or_a_file_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    """Catches the folder's advice or the OS's reason (not the errno's repr) lost."""
    assert error_of(read_weights, tmp_path) == (
        f"{tmp_path} is a directory without config.json (a sharded checkpoint?); give a .ckpt, .pt or .safetensors "
        "file or a folder written by `export --format hf`"
    )
    (tmp_path / "m.pt").write_bytes(b"x" * 20)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(weights_module, "open", refused, raising=False)  # root reads any file: refuse by hand
    assert error_of(read_weights, tmp_path / "m.pt") == f"cannot read {tmp_path / 'm.pt'}: Permission denied"


def test_settings_beside_a_state_dict_that_are_not_json_are_one_line(tiny, tmp_path):
    """Catches the settings file's path or the JSON reader's reason lost."""
    _, tensors = tiny
    torch.save(tensors, tmp_path / "m.pt")
    (tmp_path / "m.json").write_text("n_layer: 2")
    assert error_of(read_weights, tmp_path / "m.pt") == (
        f"cannot read the model settings {tmp_path / 'm.json'}: Expecting value: line 1 column 1 (char 0)"
    )


# ----------------------------------------------------------------------------------------- settings, checks


def weights_of(tensors, settings=None, kind="safetensors"):
    return weights_module.Weights(tensors, Path("w.safetensors"), kind, settings or {})


@pytest.mark.parametrize(
    "shape, settings, expected",
    [
        ((2, 32, 128), {"n_layer": 2, "n_head": None, "learning_rate": 1}, (2, 32, 2, 8)),  # None: not given
        ((2, 32, 16), {"n_layer": 1}, (1, 32, 2, 1)),  # N * H divides by D, N / H does not
        ((1, 1, 4), {"n_layer": 3}, (3, 1, 1, 4)),  # a width of 1
        ((4, 8, 6), {"n_layer": 3, "n_head": 2}, (3, 8, 2, 128)),  # N * H not a multiple of D: the default
    ],
)
def test_the_settings_the_shapes_show_fill_in_what_is_not_given(shape, settings, expected):
    """Catches given None values or non-settings merged, the multiplier read off wrongly or not at all."""
    config = weights_module.resolve_config(weights_of({"encoder": torch.ones(shape)}), settings)
    assert (config.n_layer, config.n_embd, config.n_head, config.mlp_internal_dim_multiplier) == expected


def test_weights_without_an_encoder_take_every_setting_as_given():
    """Catches the encoder's shape read when there is none, or when it is not 3-D."""
    for tensors in ({}, {"encoder": torch.ones(4, 4)}):
        config = weights_module.resolve_config(weights_of(tensors), {"n_layer": 1, "n_embd": 16})
        assert (config.n_layer, config.n_embd, config.n_head, config.mlp_internal_dim_multiplier) == (1, 16, 4, 128)


@pytest.mark.parametrize("kind", ["reference", "safetensors"])
def test_weights_that_do_not_say_their_depth_word_for_word(kind):
    """Catches the advice to write settings beside a state_dict given for other files, or mangled."""
    where = "write them beside it as w.json (as `export` does) or give" if kind == "reference" else "give"
    assert error_of(weights_module.resolve_config, weights_of({}, kind=kind)) == (
        f"w.safetensors does not say how many layers the model has; {where} the model settings (n_layer, and "
        "n_embd, n_head, mlp_internal_dim_multiplier if they differ from the shapes)"
    )


@pytest.mark.parametrize(
    "value, step", [(7, 7), (0, 0), (True, None), ("7", None), (7.0, None), (None, None)], ids=repr
)
def test_only_an_int_is_a_step(value, step):
    """Catches a bool, a string or a float taken for a step."""
    assert weights_module.step_of(value) == step and type(weights_module.step_of(value)) is type(step)


def test_errors_of_load_weights_and_init_from_name_the_file(tiny, tmp_path):
    """Catches the path left out of the shape check's message."""
    config, tensors = tiny
    save_file(tensors, tmp_path / "m.safetensors")
    other = BDHConfig(**{**TINY_MODEL, "n_embd": 64})
    message = error_of(weights_module.weights_to_start_from, tmp_path / "m.safetensors", other)
    assert message == (
        f"{tmp_path / 'm.safetensors'}: encoder is (2, 32, 128) but (2, 64, 256) with the model settings (n_layer=2, "
        "n_embd=64, n_head=2, mlp_internal_dim_multiplier=8); use the settings the weights were trained with"
    )
    given = {**TINY_MODEL, "n_embd": 64}
    assert error_of(weights_module.load_weights, tmp_path / "m.safetensors", given) == message


def test_init_from_refusals_word_for_word(tiny, tmp_path):
    """Catches the differing settings joined wrongly, or the missing file's advice mangled."""
    config, tensors = tiny
    weights_module.write_weights(tensors, config, "safetensors", tmp_path / "m.safetensors")
    other = BDHConfig(**{**TINY_MODEL, "n_embd": 64, "n_head": 4})
    assert error_of(weights_module.weights_to_start_from, tmp_path / "m.safetensors", other) == (
        f"--model.init_from {tmp_path / 'm.safetensors'} holds a model of other settings (n_embd=32, n_head=2 there, "
        "not n_embd=64, n_head=4); start from it with --model.n_embd 32 --model.n_head 2 "
        "--model.mlp_internal_dim_multiplier 8"
    )
    assert error_of(weights_module.weights_to_start_from, tmp_path / "gone.pt", config) == (
        f"--model.init_from {tmp_path / 'gone.pt'}: no such file or folder; give a .pt, .safetensors or .ckpt file "
        "or a folder written by `export --format hf`"
    )


# ------------------------------------------------------------------------------------------------- writing


def test_written_settings_files_byte_for_byte(tiny, tmp_path):
    """Catches the JSON written without its two-space indent or final newline."""
    config, tensors = tiny
    weights_module.write_weights(tensors, config, "reference", tmp_path / "m.pt")
    weights_module.write_weights(tensors, config, "hf", tmp_path / "hf")
    settings = ('  "n_layer": 2,\n  "n_embd": 32,\n  "dropout": 0.1,\n  "n_head": 2,\n  '
                '"mlp_internal_dim_multiplier": 8,\n  "vocab_size": 256')  # fmt: skip
    assert (tmp_path / "m.json").read_text() == "{\n" + settings + "\n}\n"
    assert (tmp_path / "hf/config.json").read_text() == (
        '{\n  "architectures": [\n    "BDHForCausalLM"\n  ],\n  "model_type": "bdh",\n  "num_hidden_layers": 2,\n  '
        '"hidden_size": 32,\n  "num_attention_heads": 2,\n  "mlp_internal_dim_multiplier": 8,\n  "dropout": 0.1,\n  '
        '"vocab_size": 256,\n  "tie_word_embeddings": false,\n  "torch_dtype": "float32"\n}\n'
    )
    freqs = oracle_rope_frequencies(128).view(1, 1, 1, 128)
    assert same_tensors(read_weights(tmp_path / "m.pt").tensors, {**tensors, "attn.freqs": freqs})


@pytest.mark.parametrize("format", ["reference", "safetensors", "hf"])
def test_written_files_get_the_permissions_of_a_new_file(tiny, tmp_path, format):
    """Catches the mode not masked by the umask, or masked wrongly (safetensors itself writes 0600)."""
    config, tensors = tiny
    umask = os.umask(0o012)  # not a usual one: a fixed mode would not pass
    try:
        written = weights_module.write_weights(tensors, config, format, tmp_path / OUTPUTS[format])
    finally:
        os.umask(umask)
    files = [f for path in written for f in (sorted(path.iterdir()) if path.is_dir() else [path])]
    assert len(files) == (1 if format == "safetensors" else 2), files
    assert {oct(f.stat().st_mode & 0o7777) for f in files} == {"0o664"}


def test_an_existing_output_is_kept_unless_overwrite_is_given(tiny, tmp_path):
    """Catches write_weights overwriting by default."""
    config, tensors = tiny
    (tmp_path / "m.safetensors").write_bytes(b"keep me")
    message = error_of(weights_module.write_weights, tensors, config, "safetensors", tmp_path / "m.safetensors",
                       error=UsageError)  # fmt: skip
    assert message.startswith(f"--output: {tmp_path / 'm.safetensors'} exists")
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep me"


def test_a_carried_state_form_is_refused_by_hf_only(tiny, tmp_path):
    """Catches the refusal skipped for hf, or applied to the other formats."""
    _, tensors = tiny
    config = BDHConfig(**TINY_MODEL, carry_half_lives=(64.0,))
    assert error_of(weights_module.write_weights, tensors, config, "hf", tmp_path / "hf", error=UsageError) == (
        "--format hf cannot hold model.carry_half_lives / model.carry_mean (bdh-transformers reads a carried state as "
        "the plain sum); export this model as safetensors or reference"
    )
    assert not (tmp_path / "hf").exists()
    for format in ("safetensors", "reference"):
        weights_module.write_weights(tensors, config, format, tmp_path / OUTPUTS[format])
        assert read_weights(tmp_path / OUTPUTS[format]).settings["carry_half_lives"] == [64.0]


def test_a_write_the_os_refuses_is_one_line_with_its_reason(tiny, tmp_path, monkeypatch):
    """Catches the error itself not passed on to the message."""
    config, tensors = tiny

    def refused(tensors, path, metadata=None):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(weights_module, "save_file", refused)
    output = tmp_path / "m.safetensors"
    assert error_of(weights_module.write_weights, tensors, config, "safetensors", output, error=UsageError) == (
        f"--output {output}: cannot write it (Permission denied); nothing was written"
    )
    assert list(tmp_path.iterdir()) == []


NEEDED = 1_050_000  # bytes: 1.05 MB, which rounds to 1.1 (and 1.0 if divided by anything above 1e6)


@pytest.mark.parametrize(
    "error, free, kind, reason",
    [
        (OSError(28, "quota"), 10**9, ResourceError, None),  # ENOSPC in any words
        (SafetensorError("I/O error: No space left on device (os error 28)"), 10**9, ResourceError, None),
        (PermissionError(13, "Permission denied"), NEEDED, UsageError, "Permission denied"),  # exactly enough space
        (PermissionError(13, "Permission denied"), NEEDED - 1, ResourceError, None),  # too little: the disk is full
        (PermissionError(13, "Permission denied"), OSError(5, "Input/output error"), UsageError, "Permission denied"),
        (OSError("no strerror"), 10**9, UsageError, "no strerror"),
        (RuntimeError("torch\n  said this"), 10**9, UsageError, "torch said this"),
    ],
    ids=["enospc", "safetensors-full", "just-fits", "short", "no-disk-usage", "no-strerror", "runtime-error"],
)
def test_write_errors_say_full_disk_or_the_reason(monkeypatch, tmp_path, error, free, kind, reason):
    """Catches a full disk missed (by errno, by message, by free space) or claimed for another error, a wrong
    size, the OS's reason replaced by the error's repr."""
    asked = []

    def disk_usage(path):
        asked.append(path)
        if isinstance(free, OSError):
            raise free
        return SimpleNamespace(free=free)

    monkeypatch.setattr(weights_module.shutil, "disk_usage", disk_usage)
    output = tmp_path / "m.safetensors"
    tensors = {"encoder": torch.ones(NEEDED // 4 - 100), "decoder": torch.ones(200, dtype=torch.float16)}
    made = weights_module.write_error(error, output, tensors)
    assert type(made) is kind and asked == [tmp_path]
    if kind is ResourceError:
        assert str(made) == (
            f"--output {output}: no space left on the device for 1.1 MB of weights; free some space or write elsewhere "
            "(nothing was written)"
        )
    else:
        assert str(made) == f"--output {output}: cannot write it ({reason}); nothing was written"
