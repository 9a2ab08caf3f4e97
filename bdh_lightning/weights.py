"""Weights in and out (reference state_dict, safetensors, Hugging Face folder, Lightning checkpoint), read without
running code and checked before use (docs/moving-weights.md). BDH's five tensors keep the reference's names:
embed.weight (V, D), encoder (H, D, N), encoder_v (H, D, N), decoder (H*N, D), lm_head (D, V).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .checkpoints import load_plain, weight_shapes
from .errors import CheckpointError, ConfigError, ResourceError, UsageError, is_int, one_line
from .files import output_paths, remove, replace_atomically, temporary_beside
from .layer import rope_frequencies
from .model import BDH, STORED_SETTINGS, BDHConfig

WEIGHT_NAMES = ("embed.weight", "encoder", "encoder_v", "decoder", "lm_head")
FREQS = "attn.freqs"  # the reference's constant rotary-frequency buffer
FORMATS = ("reference", "safetensors", "hf")
METADATA = "bdh_lightning."  # prefix of our keys in a safetensors file's metadata

# bdh-transformers names (BDHForCausalLM): the backbone holds the shared weights, lm_head is an nn.Linear.
HF_NAMES = {
    "embed.weight": "backbone.embed.weight",
    "encoder": "backbone.encoder",
    "encoder_v": "backbone.encoder_v",
    "decoder": "backbone.decoder",
    "lm_head": "lm_head.weight",  # (V, D): the transpose of ours
}
HF_SETTINGS = {  # config.json key -> ours
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "mlp_internal_dim_multiplier": "mlp_internal_dim_multiplier",
    "dropout": "dropout",
    "vocab_size": "vocab_size",
}


@dataclass
class Weights:
    """Weight tensors under BDH's names, with what the file says about them."""

    tensors: dict[str, torch.Tensor]
    path: Path
    kind: str  # lightning, reference, safetensors or hf
    settings: dict = field(default_factory=dict)  # architecture settings the file states (may be partial or empty)
    step: int | None = None


# ---------------------------------------------------------------------------------------------- reading


def read_weights(path: str | Path) -> Weights:
    """The weights in any supported file or folder, under BDH's names, not yet checked against settings."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return read_hf(path)
        raise CheckpointError(
            f"{path} is a directory without config.json (a sharded checkpoint?); give a .ckpt, .pt or .safetensors "
            "file or a folder written by `export --format hf`"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; give a .ckpt, .pt or .safetensors file, a folder written by `export`, or `last`"
        )
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if is_safetensors_header(head, path.stat().st_size):
        return read_safetensors(path)
    return read_torch_file(path)


def is_safetensors_header(head: bytes, size: int) -> bool:
    """A safetensors file starts with the length of its JSON header (8 bytes, little-endian), then `{`."""
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_length <= size


def read_torch_file(path: Path) -> Weights:
    """A Lightning checkpoint, a reference state_dict, or a training script's {"model": state_dict, ...}."""
    content = load_plain(path)
    if not isinstance(content, dict):
        raise CheckpointError(
            f"{path} holds a {type(content).__name__}, not a state_dict or checkpoint; "
            "use a file written by `fit` or `export`"
        )
    if isinstance(content.get("state_dict"), dict):  # Lightning
        hparams = content.get("hyper_parameters")
        settings = {k: hparams[k] for k in STORED_SETTINGS if k in hparams} if isinstance(hparams, dict) else {}
        plain = {key.replace("_orig_mod.", ""): value for key, value in content["state_dict"].items()}
        tensors = {key.removeprefix("model."): value for key, value in plain.items() if key.startswith("model.")}
        if not tensors:
            raise CheckpointError(f"{path} holds no BDH weights (no model.* keys); is it a checkpoint of this project?")
        return Weights(tensors, path, "lightning", settings, step_of(content.get("global_step")))
    state_dict, step = content, None
    if isinstance(content.get("model"), dict):  # e.g. {"model": ..., "optimizer": ..., "step": ...}
        state_dict, step = content["model"], step_of(content.get("step", content.get("iter_num")))
    not_tensors = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is neither a Lightning checkpoint nor a state_dict ({not_tensors[0]!r} is not a tensor); "
            "use a file written by `fit` or `export`"
        )
    # torch.compile'd modules save their weights under `_orig_mod.`
    tensors = {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}
    return Weights(tensors, path, "reference", read_settings_beside(path), step)


def settings_path(path: Path) -> Path:
    """Where the settings of a reference state_dict live: `model.pt` -> `model.json`."""
    return path.with_suffix(".json")


def read_settings_beside(path: Path) -> dict:
    beside = settings_path(path)
    if not beside.is_file():
        return {}
    try:
        settings = json.loads(beside.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the model settings {beside}: {error}") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{beside} is not a JSON object of model settings (n_layer, n_embd, ...)")
    return {k: settings[k] for k in STORED_SETTINGS if k in settings}


def read_safetensors(path: Path) -> Weights:
    """Our safetensors file, or any safetensors file with BDH's or bdh-transformers' tensor names."""
    tensors, metadata = safetensors_contents(path, "; use another one")
    try:
        settings = json.loads(metadata.get(METADATA + "settings", "{}"))
        step = int(metadata[METADATA + "step"]) if METADATA + "step" in metadata else None
    except ValueError:  # JSONDecodeError is one
        raise CheckpointError(
            f"{path}: its {METADATA}* metadata is not valid; give the model settings explicitly"
        ) from None
    settings = {k: settings[k] for k in STORED_SETTINGS if k in settings} if isinstance(settings, dict) else {}
    if any(name.startswith("backbone.") for name in tensors):
        tensors = from_hf_names(tensors, path, tied=False)
    known = set(WEIGHT_NAMES) | {FREQS}
    if not known & tensors.keys():
        names = ", ".join(sorted(tensors)[:3])
        raise CheckpointError(
            f"{path} holds the weights of another model ({names}...), not BDH's {', '.join(WEIGHT_NAMES)}"
        )
    return Weights(tensors, path, "safetensors", settings, step)


def read_hf(folder: Path) -> Weights:
    """A folder in the bdh-transformers layout: config.json and model.safetensors."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {error}") from None
    if not isinstance(config, dict) or config.get("model_type") != "bdh":
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(
            f"{folder} holds a Hugging Face model of type {model_type!r}, not 'bdh' (bdh-transformers)"
        )
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        sharded = (
            " (sharded checkpoints are not supported)" if (folder / "model.safetensors.index.json").is_file() else ""
        )
        raise CheckpointError(
            f"{folder} has no model.safetensors{sharded}; give a folder written by `export --format hf`"
        )
    tensors, _ = safetensors_contents(weights_file)
    # transformers ties lm_head to the embedding unless told otherwise (and then does not store it).
    tied = config.get("tie_word_embeddings", True) and "lm_head.weight" not in tensors
    settings = {ours: config[theirs] for theirs, ours in HF_SETTINGS.items() if theirs in config}
    return Weights(from_hf_names(tensors, weights_file, tied), folder, "hf", settings)


def safetensors_contents(path: Path, then: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; one CheckpointError line (ending in `then`) if unreadable."""
    try:
        with safe_open(path, framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}, file.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}){then}") from None


def from_hf_names(tensors: dict[str, torch.Tensor], path: Path, tied: bool) -> dict[str, torch.Tensor]:
    """bdh-transformers names -> BDH's; lm_head.weight (V, D) -> lm_head (D, V). Unknown names are kept (the
    key check reports them)."""
    theirs_to_ours = {theirs: ours for ours, theirs in HF_NAMES.items()}
    theirs_to_ours["backbone." + FREQS] = FREQS
    renamed = {theirs_to_ours.get(name, name): value for name, value in tensors.items()}
    if tied and "embed.weight" in renamed:
        renamed["lm_head"] = renamed["embed.weight"]
    if "lm_head" in renamed:
        if renamed["lm_head"].dim() != 2:
            raise CheckpointError(
                f"{path}: lm_head.weight has shape {tuple(renamed['lm_head'].shape)}, "
                "expected (vocab_size, hidden_size)"
            )
        renamed["lm_head"] = renamed["lm_head"].t().contiguous()
    return renamed


def step_of(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------------- settings, checks


def resolve_config(weights: Weights, settings: dict | None = None) -> BDHConfig:
    """The model settings for these weights: the file's, overridden by `settings` where given. n_embd,
    n_head and mlp_internal_dim_multiplier that neither gives are read off the encoder's shape; n_layer,
    which no shape shows, must come from one of them."""
    merged = {
        **weights.settings,
        **{k: v for k, v in (settings or {}).items() if k in STORED_SETTINGS and v is not None},
    }
    encoder = weights.tensors.get("encoder")
    if encoder is not None and encoder.dim() == 3:
        H, D, N = encoder.shape
        merged.setdefault("n_head", H)
        merged.setdefault("n_embd", D)
        heads, width = merged["n_head"], merged["n_embd"]
        if is_int(heads) and is_int(width) and width > 0 and (N * heads) % width == 0:  # bad values: BDHConfig's word
            merged.setdefault("mlp_internal_dim_multiplier", N * heads // width)
    if "n_layer" not in merged:
        where = (
            f"write them beside it as {settings_path(weights.path)} (as `export` does) or give"
            if weights.kind == "reference"
            else "give"
        )
        raise CheckpointError(
            f"{weights.path} does not say how many layers the model has; {where} the model settings (n_layer, "
            "and n_embd, n_head, mlp_internal_dim_multiplier if they differ from the shapes)"
        )
    try:
        return BDHConfig.from_dict(merged)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{weights.path} has unusable model settings: {error}") from None


def describe(config: BDHConfig) -> str:
    return ", ".join(
        f"{k}={getattr(config, k)}" for k in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier")
    )


def check_weights(tensors: dict[str, torch.Tensor], config: BDHConfig, path: str | Path) -> dict[str, torch.Tensor]:
    """BDH's five tensors, checked: no missing or extra names, the shapes of `config`, floating point, finite;
    an `attn.freqs` buffer must be the rotary frequencies BDH computes. Raises CheckpointError (one line)."""
    expected = weight_shapes(config)
    given = {name: value for name, value in tensors.items() if name != FREQS}
    missing = [name for name in expected if name not in given]
    extra = sorted(given.keys() - expected.keys())
    parts = [f"missing {', '.join(missing)}"] if missing else []
    if extra:
        parts.append(f"unexpected {', '.join(extra[:5])}")
    if parts:
        raise CheckpointError(f"{path} does not hold BDH's weights: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} is {tuple(given[name].shape)} but {shape} with the model settings "
                f"({describe(config)}); use the settings the weights were trained with"
            )
        if not given[name].is_floating_point():
            raise CheckpointError(
                f"{path}: {name} is {given[name].dtype}, not floating point; these are not BDH weights"
            )
        low, high = torch.aminmax(given[name])  # NaN propagates into both; far faster than isfinite on every value
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad = int((~torch.isfinite(given[name])).sum())
            raise CheckpointError(
                f"{path}: {name} has {bad} non-finite values (NaN or infinity); use an earlier checkpoint"
            )
    if FREQS in tensors:
        N = config.neurons_per_head
        freqs = tensors[FREQS]
        if freqs.numel() != N or not torch.equal(freqs.float().reshape(-1), rope_frequencies(N)):
            raise CheckpointError(
                f"{path}: {FREQS} is not BDH's rotary frequencies (theta 2^16, N={N}); "
                "the weights are of a modified model"
            )
    return {name: given[name] for name in expected}


def load_weights(path: str | Path, settings: dict | None = None) -> tuple[BDHConfig, dict[str, torch.Tensor], Weights]:
    """Read and check: the model settings, the five tensors (as stored: dtype unchanged), and what was read."""
    weights = read_weights(path)
    config = resolve_config(weights, settings)
    return config, check_weights(weights.tensors, config, weights.path), weights


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", settings: dict | None = None
) -> BDH:
    """The `BDH` in a .ckpt written by `fit` or any file or folder `export` writes, checked, float32, eval mode, on
    `device`. `settings` (n_layer, n_embd, ...) supply what the file does not say and override what it does."""
    config, tensors, _ = load_weights(path, settings)  # kernel: the machine's choice (auto), not the file's
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = BDH(config)
    model.load_state_dict(tensors, assign=True)  # names and shapes already checked
    return model.float().eval().to(device)


def weights_to_start_from(path: str | Path, config: BDHConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The checked tensors of `path` for a new model of settings `config` (fit --model.init_from), and the
    settings the file states. Weights of another shape are refused, naming the settings they need."""
    if not Path(path).exists():
        raise CheckpointError(
            f"--model.init_from {path}: no such file or folder; give a .pt, .safetensors or .ckpt file or a folder "
            "written by `export --format hf`"
        )
    weights = read_weights(path)
    shaped = ("n_embd", "n_head", "mlp_internal_dim_multiplier")
    differ = [k for k in shaped if k in weights.settings and weights.settings[k] != getattr(config, k)]
    if differ:
        theirs = " ".join(f"--model.{k} {weights.settings[k]}" for k in shaped if k in weights.settings)
        theirs_differ = [f"{k}={weights.settings[k]}" for k in differ]
        raise CheckpointError(
            f"--model.init_from {path} holds a model of other settings ({', '.join(theirs_differ)} there, "
            f"not {', '.join(f'{k}={getattr(config, k)}' for k in differ)}); start from it with {theirs}"
        )
    return check_weights(weights.tensors, config, weights.path), weights.settings


# ---------------------------------------------------------------------------------------------- writing


def reference_state_dict(tensors: dict[str, torch.Tensor], config: BDHConfig) -> dict[str, torch.Tensor]:
    """The reference BDH's state_dict: our tensors and its constant `attn.freqs` buffer (1, 1, 1, N)."""
    N = config.neurons_per_head
    return {**{name: tensors[name].contiguous() for name in WEIGHT_NAMES}, FREQS: rope_frequencies(N).view(1, 1, 1, N)}


def hf_config(config: BDHConfig, dtype: torch.dtype) -> dict:
    """config.json for bdh-transformers' BDHForCausalLM."""
    return {
        "architectures": ["BDHForCausalLM"],
        "model_type": "bdh",
        **{theirs: getattr(config, ours) for theirs, ours in HF_SETTINGS.items()},
        "tie_word_embeddings": False,  # lm_head is its own weight (transformers would tie it to the embedding)
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        HF_NAMES[name]: (tensors[name].t() if name == "lm_head" else tensors[name]).contiguous()
        for name in WEIGHT_NAMES
    }


def safetensors_metadata(config: BDHConfig, step: int | None) -> dict[str, str]:
    metadata = {
        "format": "pt",  # what transformers and other readers expect
        METADATA + "settings": json.dumps(config.architecture()),
        METADATA + "version": __version__,
    }
    if step is not None:
        metadata[METADATA + "step"] = str(step)
    return metadata


def export_paths(format: str, output: str | Path, overwrite: bool) -> list[Path]:
    """What writing `format` to `output` creates; UsageError if one exists (without `overwrite`) or cannot be made."""
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    output = Path(output)
    if format == "reference" and output.suffix == ".json":
        raise UsageError(
            f"--output {output}: the reference state_dict needs a name not ending in .json "
            "(its settings go to <name>.json)"
        )
    targets = [output, settings_path(output)] if format == "reference" else [output]
    return output_paths(targets, overwrite, folders=True)


def sync(path: Path) -> None:
    """Flush a written file (or each file of a written folder) to disk, with the permissions a new file gets here
    (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        os.chmod(file, 0o666 & ~umask)
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def write_weights(
    tensors: dict[str, torch.Tensor], config: BDHConfig, format: str, output: str | Path, step: int | None = None,
    overwrite: bool = False,
) -> list[Path]:  # fmt: skip
    """Write checked BDH tensors in `format`, atomically (temp file or folder, then rename); the paths written.

    An existing output is refused unless `overwrite`; a write that fails leaves nothing behind.
    """
    if format == "hf" and not config.carries_plain_sum:
        raise UsageError(
            "--format hf cannot hold model.carry_half_lives / model.carry_mean (bdh-transformers reads a carried "
            "state as the plain sum); export this model as safetensors or reference"
        )
    targets = export_paths(format, output, overwrite)
    output = targets[0]
    temporaries = [temporary_beside(target) for target in targets]
    try:
        if format == "reference":
            torch.save(reference_state_dict(tensors, config), temporaries[0])
            temporaries[1].write_text(json.dumps(config.architecture(), indent=2) + "\n")
        elif format == "safetensors":
            ours = {name: tensors[name].contiguous() for name in WEIGHT_NAMES}
            save_file(ours, temporaries[0], safetensors_metadata(config, step))
        else:
            folder = temporaries[0]
            folder.mkdir()
            dtype = tensors["encoder"].dtype
            (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")
            save_file(hf_tensors(tensors), folder / "model.safetensors", {"format": "pt"})
        for temporary in temporaries:
            sync(temporary)
        for temporary, target in zip(temporaries, targets):
            replace_atomically(temporary, target)
    except (OSError, SafetensorError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        raise write_error(error, output, tensors) from None
    finally:
        for temporary in temporaries:
            remove(temporary)
    return targets


def write_error(error: BaseException, output: Path, tensors: dict[str, torch.Tensor]) -> Exception:
    """One line for a failed write: out of space (ResourceError) or anything else the OS said (UsageError)."""
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        full = shutil.disk_usage(output.parent).free < needed  # the partial file is still there
    except OSError:
        full = False
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or full:
        return ResourceError(
            f"--output {output}: no space left on the device for {needed / 1e6:.1f} MB of weights; "
            "free some space or write elsewhere (nothing was written)"
        )
    reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
    return UsageError(f"--output {output}: cannot write it ({reason}); nothing was written")


def parameter_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(tensors[name].shape) for name in WEIGHT_NAMES)
