"""Mutation testing of the library with mutmut 3: how many deliberately broken copies the tests catch.

    python benchmarks/mutation.py                      # every module in TESTS, one after another
    python benchmarks/mutation.py layer kernels/chunked  # some of them (a module in a package by its path)
    python benchmarks/mutation.py data                 # every module of a package listed in TESTS
    python benchmarks/mutation.py layer --max-children 2

For each module, a scratch copy of the project is made under mutants/<module>/ (kernels/chunked in
mutants/kernels.chunked/; git ignores mutants/), with a [tool.mutmut] section that mutates only that module's file
and runs only its fast tests (no subprocess runs: they would take hours). mutmut changes one operator, constant or
call at a time ("mutants"), runs the tests that reach the changed function, and records whether some test failed
(killed) or all passed (survived). The score per module is killed / (mutants - equivalent ones), where EQUIVALENT
lists the mutants that compute the same thing as the original (no test can kill them; docs/testing.md says why for
each). Survivors' diffs are written to mutants/<module>/survivors.txt. Needs `pip install mutmut==3.8.1`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each module's fast tests: in-process only, seconds each. A test file per module, plus the suites that check
# the module's math against the spec oracle. A module is named by its path under bdh_lightning/ without .py
# ("kernels/chunked"); a package's own name is its __init__.py ("kernels"), or, if it has no entry of its own,
# every entry under it ("data" runs data/corpus, data/module, ...).
TESTS = {
    "layer": ["tests/test_layer.py", "tests/test_model.py", "tests/test_streams.py"],  # streams: stream_attention
    "model": ["tests/test_model.py", "tests/test_layer.py", "tests/test_streams.py", "tests/test_carried_state.py"],
    "module": ["tests/test_module.py", "tests/test_streams.py"],  # test_streams: carried state, linear decay, AGC
    "checkpoints": ["tests/test_checkpoints.py"],  # load_plain's weights wording too
    "kernels": ["tests/test_kernels.py", "tests/test_layer.py"],  # kernels/__init__.py: the dispatch
    "kernels/chunked": ["tests/test_kernels.py", "tests/test_layer.py", "tests/test_streams.py"],
    # fused: its checks in process under Triton's interpreter (ENVIRONMENT); the sm_90 build is a child process.
    # mutmut leaves decorated functions alone: the Triton kernels (@triton.jit) and fused_layer
    # (@torch.compiler.disable) are not mutated, the autograd Function, _meta and Tiles are.
    "kernels/fused": [
        "tests/test_fused.py",
        *("--deselect", "tests/test_fused.py::test_the_compiled_kernels_build_for_an_h100_without_one"),
    ],
    "kernels/masks": ["tests/test_masks.py", "tests/test_kernels.py", "tests/test_layer.py"],
    "data/corpus": [
        "tests/test_data.py",
        *("--deselect", "tests/test_data.py::test_a_recursive_glob_through_folder_links_back_to_their_parent_ends"),
    ],
    "data/module": ["tests/test_data.py", "tests/test_streams.py"],
    # streams: the layout's and batches' own tests (test_streams' training runs reach them too, minutes per mutant)
    "data/streams": [
        *(
            f"tests/test_streams.py::test_{name}"
            for name in (
                "each_row_reads_its_stretch_window_after_window_and_restarts_at_its_end",
                "no_window_spans_two_files_and_streams_restart_at_file_boundaries",
                "pieces_of_exact_multiples_of_block_size_keep_their_last_window_inside_them",
                "validation_streams_never_restart_within_one_validation",
                "validation_streams_are_as_many_as_the_windows_and_the_split_allow",
                "a_split_too_small_for_its_streams_is_one_line",
                "every_rank_reads_streams_of_its_own",
                "split_and_file_layouts_word_for_word",
                "loader_workers_take_turns_so_the_stream_is_the_same_for_any_number",
                "short_streams_read_k_windows_from_random_places_out_of_step",
                "short_streams_start_anywhere_their_windows_fit_and_nowhere_else",
                "the_jth_stream_of_row_r_starts_where_seed_r_j_says",
                "short_streams_restart_at_file_boundaries_and_never_span_two_files",
                "short_streams_are_a_pure_function_of_the_batch_number_and_the_seed",
            )
        ),
        "tests/test_data.py::test_validation_streams_read_the_validation_split_contiguously",
        "tests/test_data.py::test_streams_sampling_gives_each_row_of_each_rank_its_stretch_of_the_train_split",
    ],
    # prepared folders: test_prepare.py without its two subprocess runs (the command line, two ranks)
    **{
        name: [
            *(["tests/test_litdata.py"] if name == "data/litdata" else []),  # its helpers with a fake storage client
            "tests/test_prepare.py",
            *("--deselect", "tests/test_prepare.py::test_prepare_and_fit_through_the_real_command_line"),
            *(
                "--deselect",
                "tests/test_prepare.py::test_two_cpu_ranks_stream_disjoint_windows_of_a_prepared_directory",
            ),
        ]
        for name in ("data/litdata", "data/prepare")
    },
    "precision": ["tests/test_precision.py", "tests/test_estimate.py"],
    # estimate: the inventory pinned exactly against saved-tensor hooks of tiny forwards; the measured steps (the
    # profiler's peak of real CPU steps, about a minute per mutant) left out
    "estimate": [
        "tests/test_estimate.py",
        *("--deselect", "tests/test_estimate.py::test_prediction_matches_a_real_cpu_step"),
        *("--deselect", "tests/test_estimate.py::test_carried_state_is_counted_as_a_real_cpu_step_holds_it"),
        "tests/test_kernels.py::test_auto_choice_for_the_configs",  # choose_kernel
        "tests/test_module.py::test_choose_kernel_on_a_gpu_counts_the_carried_state",
        "tests/test_module.py::test_configure_model_chooses_the_kernel_once_from_the_data_and_precision",
    ],
    # devices: a fake NVML; test_precision's two child-process tests left out (the probe's JSON is read in-process)
    "devices": [
        "tests/test_devices.py",
        "tests/test_precision.py",
        *("--deselect", "tests/test_precision.py::test_the_child_process_probe_runs"),
        *("--deselect", "tests/test_precision.py::test_deciding_leaves_cuda_uninitialised_in_a_fresh_process"),
    ],
    "generate": ["tests/test_generate.py", "tests/test_streams.py"],
    "weights": ["tests/test_weights.py", "tests/test_checkpoints.py"],
    "errors": ["tests/test_errors.py", "tests/test_model.py", "tests/test_generate.py", "tests/test_fuzz_settings.py"],
    "console": ["tests/test_console.py"],
    # the commands' front doors: in-process runs of main() and the command functions (child-process runs skip
    # themselves under mutmut; the shipped configs' test needs the repository's data/, which a mutation copy lacks)
    "main": [
        "tests/test_cli.py",
        "tests/test_commands.py",
        "tests/test_generate.py",
        "tests/test_trust.py",
        *("--deselect", "tests/test_cli.py::test_every_shipped_config_parses_and_instantiates"),
    ],
    "commands": ["tests/test_commands.py", "tests/test_generate.py", "tests/test_trust.py", "tests/test_estimate.py"],
    "export": ["tests/test_weights.py"],
    "cli": [
        "tests/test_cli.py",
        "tests/test_commands.py",
        "tests/test_fuzz_settings.py",
        "tests/test_trust.py",
        *("--deselect", "tests/test_cli.py::test_every_shipped_config_parses_and_instantiates"),
    ],
    "monitor": ["tests/test_monitor.py", "tests/test_insight.py::test_sparsity_counts_equal_the_monitors"],
    "throughput": ["tests/test_throughput.py"],
    # faults: its callbacks driven directly with fakes (test_faults.py and test_fault_sync.py run them for real, in
    # child processes), and one real fit whose loss goes NaN between checks
    "faults": [
        "tests/test_faults_callbacks.py",
        "tests/test_fault_sync.py::test_out_of_memory_is_recognised_whoever_ran_out",
        "tests/test_fault_sync.py::test_nan_between_checks_and_no_save_is_caught_at_the_last_step",
    ],
    # files: test_files.py without the tmpfs test (it mounts one with a subprocess; monkeypatched full disks stand in)
    "files": [
        "tests/test_files.py",
        *("--deselect", "tests/test_files.py::test_a_real_full_disk_keeps_the_old_file_and_leaves_no_temporary"),
    ],
    # insight: the planted-truth tests and test_insight.py's in-process ones (its command tests run subprocesses).
    "insight/graph": [
        "tests/test_insight_planted.py",
        *(
            f"tests/test_insight.py::{t}"
            for t in (
                "test_thresholded_edges_are_the_largest_entries_of_the_dense_product",
                "test_louvain_finds_planted_communities_and_random_init_has_no_excess_modularity",
                "test_modularity_is_networkx_modularity",
                "test_power_law_exponent_is_recovered",
            )
        ),
    ],
    "insight/probes": [
        "tests/test_insight_planted.py",
        "tests/test_insight.py::test_a_neuron_wired_to_one_byte_is_found_by_probe_and_contexts",
    ],
    "insight/options": ["tests/test_insight_options.py"],
    "insight/callback": [
        "tests/test_insight_callback.py",
        "tests/test_insight.py::test_tensorboard_callback_logs_graph_and_firing_rates",
    ],
    # command: its checks, the sample it opens, and whole in-process inspects of a tiny run (test_insight.py runs the
    # command line in child processes)
    "insight/command": ["tests/test_insight_command.py"],
    # report: its HTML, JSON, summary and plots from a hand-made report (test_insight*.py's inspects reach it too,
    # minutes per mutant; test_insight.py's are child processes)
    "insight/report": ["tests/test_insight_report.py"],
    "insight/activations": [
        "tests/test_insight_activations.py",
        "tests/test_insight_planted.py",
        *(
            f"tests/test_insight.py::{t}"
            for t in (
                "test_a_neuron_wired_to_one_byte_is_found_by_probe_and_contexts",
                "test_sentence_values_are_each_sentence_read_alone",
                "test_sparsity_counts_equal_the_monitors",
                "test_sparsity_report_fractions_are_the_monitor_counts",
            )
        ),
    ],
}
# Environment a module's runs need beyond the single-thread settings: fused.py's kernels run on CPU tensors only
# under Triton's interpreter, which is chosen when triton is imported.
ENVIRONMENT = {"kernels/fused": {"TRITON_INTERPRET": "1"}}

# pytest -k expressions leaving tests out of a module's selection.
# torch.compile cannot trace through mutmut's trampolines (a graph break): these fail on the unmutated copy.
# Ctrl-C sent to a child `generate` and test_fuzz_settings' real process: each child inherits mutmut's environment
# and fails under its trampolines.
DESELECT = "not graph_breaks and not compile and not traces_as_one_graph and not ctrl_c and not real_process"

# Functions left unmutated, with why: BDHLitModule.__init__ calls save_hyperparameters(), which reads the
# arguments from its caller's frame; under mutmut's trampoline that frame is the trampoline's, and every test
# would fail on the unmutated code. What it builds is checked by test_module.py and mutated in model.py.
NOT_MUTATED = {"module": ["BDHLitModule.__init__"]}

# Equivalent mutants: they cannot change what the code computes or reports, so no test can kill them. Each is
# (module, function, text of the mutated line, why); matched on the mutant's diff, not its number, which
# changes whenever the file does. docs/testing.md lists them.
CPU_ONLY = "the same on a CPU-only machine; on CUDA tensors it would mix devices (benchmarks/gpu_suite.py runs there)"
# The chunked kernel's device arguments as mutated: device=None or dropped from torch.zeros, from seed.to and block_keep.
KERNEL_DEVICE_MUTANTS = ("device=None", "dtype=acc, )", "dtype=wide, )", "seed.to(None)", "n1, dropout, None)",
                         "n1, dropout, )")  # fmt: skip
EQUIVALENT = [
    *[
        ("errors", "text_bytes", text, "str.encode's default codec is UTF-8, and codec names ignore case")
        for text in ('value.encode(errors="surrogateescape")', 'value.encode("UTF-8", errors="surrogateescape")')
    ],
    # generate.py
    *[
        ("generate", "sample_next", text, "the logits are 2-D (B, V): dimension 1 is dimension -1")
        for text in (
            "argmax(dim=+1)",
            "dim=+1).values",
            "softmax(logits, dim=+1)",
            "sort(dim=+1",
            "cumsum(dim=+1)",
            "scatter(+1,",
            "squeeze(+1)",
            "logits.shape[+1]",
        )
    ],  # fmt: skip
    *[
        ("generate", "sample_next", text, "topk, softmax and sort take the last dimension of the 2-D logits anyway")
        for text in (
            "torch.topk(logits, top_k, ).values",
            "F.softmax(logits, dim=None)",
            "F.softmax(logits, )",
            "probs.sort(descending=True)",
        )
    ],  # fmt: skip
    ("generate", "sample_next", 'float("-INF")', "float() reads inf in any case"),
    ("generate", "sample_next", "top_k <= logits.shape[-1]", "a top_k of all V bytes keeps every byte"),
    *[
        ("generate", f, "top_p: float = 2.0", "every top_p of 1 or more skips the nucleus")
        for f in ("sample_next", "generate_text")
    ],
    *[
        ("generate", f, text, "a prompt read in chunks of any size gives the same logits (tested)")
        for f, text in (
            ("generate_text", "chunk_size: int = 257"),
            ("generate_text", "generator, )"),
            ("prefill", "chunk_size: int = 257"),
        )
    ],  # fmt: skip
    *[
        ("generate", "sample_bytes", text, "torch.tensor of Python ints is int64")
        for text in ("dtype=None, device=device)", "torch.tensor(list(prompt), device=device)")
    ],
    *[
        ("generate", f, text, CPU_ONLY)
        for f, text in (
            ("sample_bytes", "device=None)"),
            ("sample_bytes", "dtype=torch.long, )"),
            ("sample_bytes", "device = None"),
            ("__init__", "device=None, dtype"),
            ("__init__", "torch.zeros(shape, dtype=torch.float32)"),
        )
    ],  # fmt: skip
    ("generate", "sample_bytes", "Generator(model, ).generate", "zero states of one row broadcast over the rows"),
    ("generate", "__init__", "states = None", "forward_stream reads no state as zero states"),
    ("estimate", "choose_kernel", "B, T, precision, ).kernels", "estimate_memory's device_type defaults to cuda"),
    *[
        ("estimate", "largest_batch", text, why)
        for text, why in (
            ("range(low, 3 * low)", "a wider range above a batch that does not fit: bisect ends at the same batch"),
            ("low = 2", "batch 1 fits; doubling from 2 brackets the same batch (2 not fitting: 2 - 1 + 0 = 1)"),
        )
    ],
    # the embedding's layer-norm stats: float32 under autocast on CUDA, and every autocast precision's p is 4 anyway
    *[
        ("estimate", "saved_bytes", f"{text} else p)", "under autocast p is 4 bytes: the stats are p bytes anyway")
        for text in ('device_type == "cuda") and False', 'device_type != "cuda"', '"XXcudaXX"', '"CUDA"')
    ],
    ("precision", "compute_dtype", 'name or "XX32XX"', "an unknown name computes in float32 too, as 32 does"),
    # kernels/masks.py: the index vectors' dtype and device.
    (
        "kernels/masks",
        "dropout_mask",
        ".view(H, 1, 1)",
        "a 3-D (H, 1, 1) broadcasts against the 4-D rows as (1, H, 1, 1)",
    ),
    *[
        ("kernels/masks", f, text, "torch.arange of Python ints is int64 whatever the default dtype")
        for f in ("block_keep", "dropout_mask")
        for text in (
            "dtype=None, device=device)",
            *(f"arange({n}, device=device)" for n in ("batch", "length", "start, stop", "H", "B", "T", "N")),
        )
    ],
    *[
        ("kernels/masks", f, text, CPU_ONLY)
        for f in ("block_keep", "dropout_mask")
        for text in ("dtype=torch.int64, device=None)", "dtype=torch.int64, )", "(device is None) or True")
    ],
    ("layer", "causal_attention", "q.transpose(-1, +2)", "dimension 2 of the 4-D q is dimension -2"),
    ("layer", "layer_norm", "F.layer_norm(x, x.shape[-1:], )", "F.layer_norm's default eps is 1e-5, LN_EPS"),
    ("layer", "reference_layer", "elif training and dropout >= 0:", "F.dropout with p = 0 is the identity"),
    ("layer", "reference_layer", "z = F.dropout(z, dropout, )", "F.dropout's training defaults to True"),
    ("layer", "rope_cos_sin", "positions.to(None)", "integer positions take the float type of f in the product anyway"),
    ("layer", "rope_cos_sin", "unsqueeze(+1)", "positions are 1-D: dimension 1 is dimension -1"),
    ("layer", "rope_cos_sin", "rope_frequencies(n, None)", CPU_ONLY),
    ("layer", "rope_cos_sin", "rope_frequencies(n, )", CPU_ONLY),
    ("layer", "rope_frequencies", "dtype=None", "int64 k gives the same float32 k / n"),
    ("layer", "rope_frequencies", "torch.arange(n, device=device)", "int64 k gives the same float32 k / n"),
    ("layer", "rope_frequencies", "device=None", CPU_ONLY),
    ("layer", "rope_frequencies", "torch.arange(n, dtype=torch.float32, )", CPU_ONLY),
    ("layer", "carried_read", ".transpose(-1, +2)", "dimension 2 of the 4-D q is dimension -2"),
    (
        "layer",
        "rope_cos_sin",
        "% 2.0).to(torch.float32)",
        "cos and sin have period 2 pi: one float32 ulp of the phase at most",
    ),
    ("layer", "rope_cos_sin", "f.to(None)) % 1.0", "float64 positions times float32 f is a float64 product anyway"),
    (
        "layer",
        "rope_cos_sin",
        "int(positions.max()) > EXACT_PHASES_FROM",
        "at t = 2**13 (a power of two) both branches agree",
    ),
    (
        "layer",
        "rope_cos_sin",
        "positions.unsqueeze(-1) > EXACT_PHASES_FROM",
        "at t = 2**13 (a power of two) both branches agree",
    ),
    ("model", "__post_init__", "self.neurons_per_head <= 1", "N = 1 is odd: refused by the parity test either way"),
    ("model", "__init__", "nn.init.normal_(p, std=0.02)", "normal_'s mean defaults to 0"),
    ("model", "forward", "torch.arange(idx.shape[1], )", CPU_ONLY),
    ("model", "forward", "device=None", CPU_ONLY),
    ("model", "forward_stream", "start.to(None)", CPU_ONLY),
    ("model", "forward_stream", "device=None", CPU_ONLY),
    ("model", "forward_stream", "torch.arange(T, )", CPU_ONLY),
    ("model", "forward_stream", "torch.arange(start, start + T, )", CPU_ONLY),
    ("model", "forward_stream", "carry_form(c, T, start, None)", CPU_ONLY),
    ("model", "x_carry_form", "g.view(1, -1, 1, 1).to(None)", CPU_ONLY),
    ("model", "x_carry_form", "torch.as_tensor(start, device=None)", CPU_ONLY),
    ("model", "x_carry_form", "torch.as_tensor(start, )", CPU_ONLY),
    ("model", "x_carry_form", "g.view(-1, 1, 1)", "(H, 1, 1) broadcasts over (B, H, N, D) as (1, H, 1, 1) does"),
    (
        "model",
        "x_carry_form",
        "torch.ones(c.n_head, dtype=None)",
        "ones are exact in float32, and a half-life's float64 factor, k and the kernel's .to(dtype) make every result the same",
    ),
    (
        "model",
        "x_carry_form",
        "torch.ones(c.n_head, )",
        "ones are exact in float32, and a half-life's float64 factor, k and the kernel's .to(dtype) make every result the same",
    ),
    (
        "model",
        "x_carry_form",
        ".to(None).view(-1, 1, 1, 1) // T",
        "an integer k: g**k and torch.where with float64 give the same float64 values",
    ),
    (
        "checkpoints",
        "on_train_batch_end",
        "super().on_train_batch_end(trainer, pl_module, None, batch, batch_idx)",
        "ModelCheckpoint.on_train_batch_end reads neither outputs, batch nor batch_idx",
    ),
    (
        "checkpoints",
        "on_train_batch_end",
        "super().on_train_batch_end(trainer, pl_module, outputs, None, batch_idx)",
        "ModelCheckpoint.on_train_batch_end reads neither outputs, batch nor batch_idx",
    ),
    (
        "checkpoints",
        "on_train_batch_end",
        "super().on_train_batch_end(trainer, pl_module, outputs, batch, None)",
        "ModelCheckpoint.on_train_batch_end reads neither outputs, batch nor batch_idx",
    ),
    (
        "checkpoints",
        "on_train_end",
        "if self.save_last or not",
        "ModelCheckpoint._save_last_checkpoint returns at once without save_last",
    ),
    ("checkpoints", "load_plain", "map_location=None", "map_location only matters for tensors saved on a GPU"),
    ("checkpoints", "load_plain", "torch.load(path, weights_only=True, mmap=zipped)", "as map_location=None"),
    ("checkpoints", "load_plain", "weights_only=None", "torch >= 2.6 defaults to weights_only=True"),
    ("checkpoints", "load_plain", 'map_location="cpu", mmap=zipped)', "torch >= 2.6 defaults to weights_only=True"),
    ("checkpoints", "run_precision", '.get("trainer", None)', "None.get's AttributeError is caught: None either way"),
    ("checkpoints", "run_precision", '.get("trainer", )', "None.get's AttributeError is caught: None either way"),
    # weights.py
    *[
        (
            "weights",
            "read_weights",
            text,
            "the header check looks at the first 9 bytes only: a longer head (None: the whole file) reads alike",
        )
        for text in ("head = file.read(None)", "head = file.read(10)")
    ],
    ("weights", "read_safetensors", "path, tied=None)", "None is falsy as False is: a missing lm_head stays missing"),
    ("weights", "write_error", "full = None", "None is falsy as False is: not known to be full"),
    (
        "weights",
        "sync",
        "umask = os.umask(1)",
        "os.umask returns the mask it replaces whatever it sets, and the next line sets that one back",
    ),
    ("weights", "sync", "with open(file, ) as handle:", "only the descriptor is fsynced: text mode reads nothing"),
    # data.py
    *[
        (
            "data/corpus",
            "excluded",
            text,
            "the last piece of a split at every / is the last piece of one split from the right",
        )
        for text in ('relative.rsplit("/", )[-1]', 'relative.rsplit("/", 2)[-1]')
    ],
    *[
        (
            "data/corpus",
            "download_tinyshakespeare",
            text,
            "HTTP header names are case-insensitive (http.client's HTTPMessage)",
        )
        for text in ('headers.get("content-length")', 'headers.get("CONTENT-LENGTH")')
    ],
    *[
        (
            "data/corpus",
            "download_tinyshakespeare",
            text,
            "the copy's chunk size: the same bytes written, hashed and counted",
        )
        for text in ("response.read(None)", "response.read(2 << 16)", "response.read(1 << 17)")
    ],
    (
        "data/corpus",
        "list_corpus",
        "os.path.join(expanded, ) if",
        "the prefix without its trailing /: each stored name keeps one byte more, the same paths",
    ),
    (
        "data/corpus",
        "list_glob",
        "if (root) or True else match",
        "for a glob without a folder, relpath against '' (the working directory) is the match itself",
    ),
    (
        "data/corpus",
        "glob_matches",
        "if (glob.has_magic(head)) or True else [head]",
        "glob.glob of a path without wildcards is that path when it exists; folders_below skips one that does not",
    ),
    (
        "data/corpus",
        "size_if_readable",
        "open(file, )",
        "the file is opened for its size and never read: the mode does not matter",
    ),
    *[
        ("data/corpus", "__init__", text, "sizes from a listing or os.fstat are int64 anyway (numpy 2)")
        for text in ("else sizes, dtype=None)", "else sizes, )")
    ],
    (
        "data/corpus",
        "finish",
        "if (keep.all()) and False else",
        "the shortcut for a listing with nothing left out: joining every path's bytes gives the same blob",
    ),
    (
        "data/corpus",
        "__init__",
        'prefix: str = "XXXX"',
        "list_corpus gives every Listing its prefix: the default is unused",
    ),
    (
        "data/corpus",
        "__init__",
        'array("Q")',
        "signed and unsigned 64-bit arrays hold the same bytes for offsets, sizes, devices and inodes below 2**63",
    ),
    *[
        (
            "data/corpus",
            "__init__",
            text,
            "finish() sets files, sizes and identities before list_corpus returns a listing",
        )
        for text in ("self.files, self.sizes = PathList(", 'self.identities = ""')
    ],
    (
        "data/corpus",
        "add",
        "if (name.startswith(self._prefix_bytes)) or True",
        "every name list_corpus adds starts with its listing's prefix",
    ),
    *[
        (
            "data/corpus",
            "finish",
            text,
            "as float64 bit patterns the (device, inode) pairs stay distinct and compare alike",
        )
        for text in (
            "np.frombuffer(self._devices, None)",
            "np.frombuffer(self._devices, )",
            "np.frombuffer(self._inodes, None)",
            "np.frombuffer(self._inodes, )",
        )
    ],
    (
        "data/corpus",
        "finish",
        'self.left_out["already read through another link"] = int(',
        "finish runs once per listing and is the only writer of that reason",
    ),
    ("data/corpus", "finish", 'self._inodes = ""', "both drop the arrays the listing was built in"),
    ("data/corpus", "descriptor", "popitem(last=None)", "None is false: last=False"),
    (
        "data/corpus",
        "pread_into",
        "while done <= len(buffer):",
        "one more preadv, of an empty buffer: it returns 0 and breaks",
    ),
    (
        "data/corpus",
        "shrunk",
        "str(None)",
        "an OSError from os.stat always carries strerror: str(error) is never reached",
    ),
    *[
        ("data/module", "loader", text, "pin_memory is False without CUDA (on a GPU: the same values, copied unpinned)")
        for text in ("pin_memory=None)", "num_workers=self.num_workers, )")
    ],
    (
        "data/module",
        "batch",
        "rng.integers(self.train_size - self.block_size, size=",
        "Generator.integers(n) draws exactly as integers(0, n) (checked)",
    ),
    # data/streams.py
    *[
        (
            "data/streams",
            "__init__",
            text,
            "a file boundary at a stretch's own end makes an empty piece: no window, dropped",
        )
        for text in ("if lo <= s < hi]", "if lo < s <= hi]")
    ],
    *[
        ("data/streams", f, text, "a list of Python ints makes an int64 array or tensor anyway")
        for f in ("__init__", "batch")
        for text in ("np.array(starts, dtype=None)", "np.array(starts, )", "dtype=None)", "in places], )")
    ],
    *[
        (
            "data/streams",
            "validation_streams",
            text,
            "validation_streams calls batch(k) itself: start only seeds __iter__",
        )
        for text in ("StreamBatches(corpus, layout, 0, rows, None)", "StreamBatches(corpus, layout, 0, rows, 1)")
    ],
    (
        "module",
        "on_train_batch_start",
        "generate_state(2)[0]",
        "the first word of SeedSequence's state does not depend on how many are drawn",
    ),
    ("module", "test_step", "self.validation_step(batch, None)", "validation_step does not read batch_idx"),
    ("main", "bare_flags", 'given.append("TRUE")', "jsonargparse reads a bool's value ignoring case"),
    ("main", "run_command", "exit_on_error=None", "None is false as False is: errors are raised, not exits"),
    ("module", "carried_loss", "to(device=None, dtype", CPU_ONLY),
    ("module", "carried_loss", "(start != 0).to(dtype=states[0].dtype)", CPU_ONLY),
    (
        "module",
        "carried_loss",
        "dtype=None).view(-1, 1, 1, 1)",
        "a bool mask multiplies a float state in place exactly as 0.0/1.0 does",
    ),
    (
        "module",
        "carried_loss",
        "(start != 0).to(device=states[0].device, )",
        "a bool mask multiplies a float state in place exactly as 0.0/1.0 does",
    ),
    ("module", "on_load_checkpoint", "saved[self.global_rank].to(None)", CPU_ONLY),
    ("module", "configure_model", 'getattr(self, "_compiled", None)', "None and False are both false"),
    ("module", "learning_rate_at", 'hp.get("decay", None)', "hparams always hold decay (the constructor's default)"),
    ("module", "learning_rate_at", 'hp.get("decay", )', "hparams always hold decay (the constructor's default)"),
    (
        "module",
        "learning_rate_at",
        'hp.get("decay", "XXcosineXX")',
        "hparams always hold decay (the constructor's default)",
    ),
    (
        "module",
        "learning_rate_at",
        'hp.get("decay", "COSINE")',
        "hparams always hold decay (the constructor's default)",
    ),
    ("cli", "parse_settings", "run=None", "LightningCLI reads `run` only for its truth: None is false, as False is"),
    ("cli", "parse_settings", '"--seed_everything", "FALSE"', "jsonargparse reads a bool ignoring case"),
    # fused.py: its buffers' device (CPU_ONLY); their dtype left to torch.empty's default, float32; the float32
    # accumulators' no-op casts (acc is float32: float64 is refused); the gradients' casts (autograd makes them).
    *[
        ("kernels/fused", f, text, CPU_ONLY)
        for f in ("forward", "backward")
        for text in ("device=None)", "dtype=torch.float32, )", "dtype=att, )")
    ],
    *[
        ("kernels/fused", "forward", text, "rope_cos_sin's cos and sin are float32 always: the cast is a no-op")
        for text in ("cos.to(None)", "sin.to(None)")
    ],
    *[
        (
            "kernels/fused",
            "_meta",
            text,
            "runs only with compiled Triton (a GPU): never under this machine's interpreter",
        )
        for text in ('meta["num_warps"] = None', 'meta["XXnum_warpsXX"]', 'meta["NUM_WARPS"]')
    ],
    *[
        ("kernels/fused", f, text, "torch.empty's default dtype is float32 (the package never changes it)")
        for f in ("forward", "backward")
        for text in (
            "T, D, dtype=None, device",
            "D, N, dtype=None, device",
            "N, D, dtype=None, device",
            "T, D, device=x.device)",
            "D, N, device=x.device)",
            "N, D, device=x.device)",
        )  # fmt: skip
    ],
    *[
        (
            "kernels/fused",
            "backward",
            text,
            "acc is float32 (fused refuses float64): a float32 tensor's .to(acc) is a no-op",
        )
        for text in ("read_backward(dy.to(None)", "dx_heads.sum(1).to(None)")
    ],
    *[
        ("kernels/fused", "backward", text, "autograd casts a returned gradient to its input's dtype")
        for text in ("dx.unsqueeze(1).to(None)", "d_enc.to(None)", "d_enc_v.to(None)", "d_dec.view(H * N, D).to(None)")
    ],
    (
        "kernels/fused",
        "backward",
        "dx_s.to(None).sum(1)",
        "not equivalent, indistinguishable: the heads' shares of dx summed in bf16, not float32: one more rounding "
        "(2**-9 relative) of a gradient the bf16 checks compare at 2e-2",
    ),
    (
        "kernels/fused",
        "backward",
        "(1.0 - dropout)).to(None)",
        "dL/du comes in the dtype forward gave u, `dtype`: the cast is a no-op",
    ),
    ("kernels/fused", "backward", "*[None] * 6", "autograd takes trailing None gradients beyond the inputs"),
    *[
        ("kernels/fused", f, "dropout >= 0", "the kernels' mask with p = 0 keeps every entry (threshold 0)")
        for f in ("forward", "backward")
    ],
    (
        "kernels/fused",
        "backward",
        "grad_u.squeeze(2)",
        "the kernels read dL/du through its pointer: (B, 1, T, D) and (B, T, D) contiguous are the same memory",
    ),
    (
        "kernels/fused",
        "__post_init__",
        "size & (size - 2)",
        "from 16 up, n & (n - 2) is 0 exactly when n is a power of two, as n & (n - 1)",
    ),
    # kernels.py: the device of the chunked kernel's buffers, seed and masks (torch.zeros, seed.to, block_keep).
    *[("kernels/chunked", f, text, CPU_ONLY) for f in ("forward", "backward") for text in KERNEL_DEVICE_MUTANTS],
    (
        "kernels/chunked",
        "forward",
        "if len(chunks) >= 1:",
        "recomputes a head's activations when it is one chunk: same values",
    ),
    ("kernels/chunked", "forward", "if dropout >= 0:", "block_keep with p = 0 keeps every entry"),
    ("kernels/chunked", "backward", "if dropout >= 0:", "block_keep with p = 0 keeps every entry"),
    (
        "kernels/chunked",
        "forward",
        "(state is not None) or True",
        "without a state it adds a zero carried read: the same sum",
    ),
    (
        "kernels/chunked",
        "backward",
        "one_chunk = None",
        "one chunk through the several-chunks path: a's two gradient shares as two products (the same sum, rounded apart)",
    ),
    ("kernels/chunked", "backward", "d_dec[h, n0:n1] = ", "each slice of the zeroed gradient is written once"),
    ("kernels/chunked", "backward", "d_enc_v[h, :, n0:n1] = ", "each slice of the zeroed gradient is written once"),
    (
        "kernels/chunked",
        "backward",
        "d_enc[h, :, n0:n1] = x_flat.T @ da_from_z",
        "pass A writes each slice of the zeroed gradient once; pass B adds to it",
    ),
    *[
        ("kernels/chunked", "backward", text, "autograd casts a returned gradient to its input's dtype")
        for text in ("dx.unsqueeze(1).to(None)", "d_enc.to(None)", "d_enc_v.to(None)", "d_dec.view(H * N, D).to(None)")
    ],
    (
        "kernels/chunked",
        "backward",
        "grad_u.squeeze(1).to(None)",
        "one division of a 16-bit value rounds alike from float32 (16-bit arithmetic runs in float32; checked)",
    ),
    ("kernels/chunked", "chunked_layer", "torch.zeros((), dtype=None)", "the next line makes the seed int64"),
    ("kernels/chunked", "chunked_layer", "torch.zeros((), )", "the next line makes the seed int64"),
    (
        "kernels/chunked",
        "chunk_width",
        "batch_tokens * n < AUTO_CHUNK_ELEMENTS",
        "at equality: one piece of n either way",
    ),
    ("kernels/chunked", "draw_seed", "dtype=None)", "torch.randint's default dtype is int64"),
    ("kernels/chunked", "draw_seed", "torch.randint(0, 2**62, (), )", "torch.randint's default dtype is int64"),
    ("kernels/chunked", "draw_seed", "torch.randint(2**62, ()", "torch.randint's low defaults to 0"),
    ("kernels", "resolve_kernel", "n_wide: int = 1", "0 and 1 are both far below CPU_CHUNKED_FROM"),
    (
        "kernels",
        "apply_layer",
        "cos, sin, p, )",
        "fused_layer takes chunk_size for the common signature and ignores it",
    ),
    (
        "kernels",
        "apply_layer",
        "    x, encoder, encoder_v, decoder, cos, sin, dropout if training else 0.0, )",  # fused_layer's arguments
        "fused_layer accepts chunk_size and ignores it (its tiles are its own)",
    ),
    # files.py
    *[
        ("files", "remove", text, "a missing file's FileNotFoundError is an OSError, suppressed around it anyway")
        for text in ("path.unlink(missing_ok=None)", "path.unlink(missing_ok=False)")
    ],
    (
        "files",
        "sync_tree",
        "open(file, )",
        "open's default mode reads; fsync needs only the descriptor, nothing is decoded",
    ),
    ("files", "write_atomically", 'data.encode("UTF-8")', "codec names ignore case"),
    # monitor.py
    *[
        ("monitor", "sample", text, "str.encode and bytes.decode default to UTF-8, and codec names ignore case")
        for text in (
            'encode(errors="surrogateescape")',
            'encode("UTF-8"',
            'decode(errors="backslashreplace")',
            'decode("UTF-8"',
        )
    ],  # fmt: skip
    *[
        (
            "monitor",
            "SparsityMonitorǁ__init__",
            text,
            "on_validation_epoch_start sets it before any batch of every validation",
        )
        for text in ("self.entries = None", "self.entries = 1")
    ],
    ("monitor", "on_validation_batch_end", "dataloader_idx=1", "the dataloader index is not read"),
    # throughput.py
    *[
        ("throughput", f, text, "a batch is (inputs, targets), both (B, T): the targets' shape is the inputs'")
        for f, text in (("add", "batch[1].shape[0]"), ("add", "batch[1].numel()"), ("batch_flops", "batch[1].shape"))
    ],
    ("throughput", "batch_flops", "training=None", "None is falsy as False is: forward FLOPs either way"),
    *[
        (
            "throughput",
            "ThroughputMonitorǁ__init__",
            text,
            "setup (available_flops, world_size) or on_train_start (train) sets it before any hook reads it",
        )
        for text in (
            'self.available_flops: float | None = ""',
            "self.world_size = None",
            "self.world_size = 2",
            'self.train: Span | None = ""',
        )
    ],  # fmt: skip
    (
        "throughput",
        "_evaluation_end",
        "if not trainer.is_global_zero and trainer.sanity_checking or self.evaluation is None:",
        "a span is only ever started on rank 0 outside a sanity check: elsewhere evaluation is None either way",
    ),
    *[
        ("throughput", f, "dataloader_idx=1", "the dataloader index is not read")
        for f in ("on_validation_batch_end", "on_test_batch_end")
    ],
    ("throughput", "_evaluation_batch_end", "training=None", "None is falsy as False is: forward FLOPs either way"),
    (
        "throughput",
        "on_train_batch_end",
        "last = trainer.max_steps >= 0 and",
        "with max_steps 0 Lightning runs no training batch",
    ),
    # insight/probes.py
    *[
        ("insight/probes", "ranking", text, "scipy's defaults written out: two-sided, axis 0")
        for text in ("mannwhitneyu(x, y, axis=0)", 'mannwhitneyu(x, y, alternative="two-sided", )')
    ],
    ("insight/probes", "ranking", 'alternative="TWO-SIDED"', "scipy reads the alternative in any case"),
    ("insight/probes", "permutation_null", "(size, n)), )", "argsort's default axis, -1, is 1 for the 2-D draws"),
    (
        "insight/probes",
        "permutation_null",
        "chunk: int = 101",
        "rows of n consecutive draws from one stream: the same relabellings in chunks of any size",
    ),
    (
        "insight/probes",
        "permutation_null",
        "seed: int = 1",
        "another fixed seed: an equally valid, equally "
        "reproducible draw of the null (its statistics are tested, not one draw)",
    ),
    *[
        ("insight/probes", "ranking", text, "mean sentence values are finite: Mann-Whitney gives no NaN to replace")
        for text in ("np.nan_to_num(U, )", "nan=pairs * 2", "nan=pairs / 3", "np.nan_to_num(p, )", "nan=2.0")
    ],
    (
        "insight/probes",
        "ranking",
        "(null[None, :] > effect[:, None] - 1e-9)",
        "U and the null are multiples of 1/2: none lies within 1e-9 below an effect without equalling it",
    ),
    *[
        (
            "insight/probes",
            "ranking",
            text,
            "differs only at a p-value of exactly 0.05: no exact Mann-Whitney p of "
            "small samples is (searched), asymptotic ones are not round",
        )
        for text in ("int((p <= ALPHA).sum())", "int((p_bh <= ALPHA).sum())", "int((p_holm <= ALPHA).sum())")
    ],
    # insight/graph.py
    *[
        ("insight/graph", "community_order", text, "an array of Python ints is int64 anyway")
        for text in ("if i not in seen], dtype=None)", "if i not in seen], )")
    ],
    ("insight/graph", "degree_summary", 'kind="STABLE"', "numpy reads the sort kind in any case"),
    ("insight/graph", "modularity", "labels[pairs[:, 1]], 1]]", "an inside edge's two endpoints have one label"),
    (
        "insight/graph",
        "modularity",
        "total = np.bincount(labels, weights=degree, )",
        "labels holds every label up to its largest: bincount's length is labels.max() + 1 anyway",
    ),
    # faults.py
    *[
        (
            "faults",
            "StopEveryRankǁ__init__",
            text,
            "setup sets the rank whenever it sets the store, and the rank is read only with a store",
        )
        for text in ("self.rank = None", "self.rank = 1")
    ],
    (
        "faults",
        "StopOnNonFiniteǁ__init__",
        'self.bad_loss: torch.Tensor | None = ""',
        "on_train_start resets it, and the first on_before_backward sets it with bad_step before anything reads it",
    ),
    *[
        (
            "faults",
            "on_before_backward",
            text,
            "torch.full of an int fills int64; torch.zeros' default dtype is float32",
        )
        for text in (
            "torch.full((), -1, dtype=None, device=loss.device)",
            "torch.full((), -1, device=loss.device)",
            "torch.zeros((), dtype=None, device=loss.device)",
            "torch.zeros((), device=loss.device)",
        )
    ],
    *[
        ("faults", "on_before_backward", text, CPU_ONLY)
        for text in (
            "torch.full((), -1, dtype=torch.int64, device=None)",
            "torch.full((), -1, dtype=torch.int64, )",
            "torch.zeros((), dtype=torch.float32, device=None)",
            "torch.zeros((), dtype=torch.float32, )",
        )
    ],
    (
        "faults",
        "RankWatchǁrun",
        'f"exit code {code}" if code >= 0 else',
        "only ranks that ended with a non-zero code reach the line: 0 is never asked about",
    ),
    (
        "faults",
        "stop_if_non_finite",
        "if self.bad_step is not None else -2",
        "any negative step means none was seen: -1 and -2 read alike",
    ),
    # insight/callback.py
    (
        "insight/callback",
        "__init__",
        "every_n_validations, zero=",
        "non_negative_int's error class defaults to ConfigError",
    ),
    ("insight/callback", "on_validation_batch_end", "dataloader_idx=1", "the dataloader index is not read"),
    # insight/activations.py
    *[
        ("insight/activations", "show_bytes", text, "bytes.decode defaults to UTF-8, and codec names ignore case")
        for text in ('decode(errors="backslashreplace")', 'decode("UTF-8"')
    ],
    (
        "insight/activations",
        "sparsity_report",
        "k = neurons.contexts if neurons else 1",
        "without neurons no TopValues is filled or read",
    ),
    *[
        (
            "insight/activations",
            "sparsity_report",
            text,
            "float counts of positions are exact: the eligibility test and int() read them alike",
        )
        for text in ("torch.zeros(H * N, dtype=None)", "torch.zeros(H * N, )  #")
    ],
    (
        "insight/activations",
        "selective_neurons",
        "if eligible.any() else 1.0",
        "with no eligible neuron the floor is never used: every score is 0",
    ),
    (
        "insight/activations",
        "add",
        "if self.values.shape[0] >= self.k:",
        "at exactly k rows it only sorts them: the "
        "same set is kept, and nothing reads their order (means, and contexts each listed with its value)",
    ),
    *[
        ("insight/activations", "spearman", text, "numpy's 0 / 0.0 is NaN too (a constant has no rank correlation)")
        for text in ("if (denominator > 0) or True else", "if denominator >= 0 else")
    ],
    (
        "insight/activations",
        "loss_correlation",
        "seed: int = 1",
        "another fixed seed: an equally valid, equally "
        "reproducible bootstrap (tested against the procedure at a given seed)",
    ),
    ("insight/activations", "loss_correlation", "rng.integers(windows, size=", "Generator.integers' low defaults to 0"),
    *[
        (
            "insight/activations",
            "TopValuesǁ__init__",
            text,
            "torch.cat passes over a 1-D empty tensor (legacy rule): the first batch's rows set the shape",
        )
        for text in ("torch.empty(0, ), torch.empty(0, width", "torch.empty(0, dtype=torch.long)")
    ],
    (
        "insight/activations",
        "loss_correlation",
        "if (math.isfinite(rho)) or True else None",
        "finite_or_none turns scipy's NaN p of a constant into None anyway",
    ),
    # insight/command.py
    ("insight/command", "open_sample", "or 257), 256)", "min(257, 256) is 256 too"),
    *[
        ("insight/command", "write_reports", text, "inspect_checkpoint does not read its out argument")
        for text in ("inspect_checkpoint(ckpt, None, *looks)", "inspect_checkpoint(path, None, *looks)")
    ],
    ("insight/command", "inspect_models", 'edges=w["edges"], null=None)', "None is falsy as False is: no null draws"),
    (
        "insight/command",
        "inspect_command",
        'sentences = ""',
        "an empty string is falsy as None is: no probe either way",
    ),
    *[
        (
            "insight/command",
            "inspect_command",
            text,
            "write_report makes the report's folder itself, and the swap and clean-up treat a folder alike",
        )
        for text in (
            'what=f"--output {out}", folder=None)',
            'what=f"--output {out}", )',
            'what=f"--output {out}", folder=False)',
        )
    ],  # fmt: skip
    # data/litdata.py
    ("data/litdata", "Preparedǁ__init__", "self._datasets = None", "_datasets is never read (noticed, left alone)"),
    *[
        (
            "data/litdata",
            f,
            text,
            "called only at import (the manifest schema's constants), before mutmut switches "
            "a mutant on: no test can run it",
        )
        for f, text in (("Ruleǁ__init__", "self.words, self.test = None"), ("Absentǁ__init__", "self.schema = None"))
    ],
    # data/prepare.py
    *[
        ("data/prepare", f, text, "codec names ignore case")
        for f, text in (
            ("document_split", 'encode("UTF-8", "surrogateescape")'),
            ("Packerǁ__call__", 'encode("UTF-8", "surrogatepass")'),
        )
    ],  # fmt: skip
    (
        "data/prepare",
        "document_split",
        "int.from_bytes(digest, )",
        'int.from_bytes\'s byteorder defaults to "big" from Python 3.11 (on 3.10 it is required: a TypeError)',
    ),
    *[
        (
            "data/prepare",
            "jsonl_ranges",
            text,
            "the loop's test only ends it early: a seek at or past the end reads no line and the break ends it there",
        )
        for text in ("while cuts[-1] - UNIT_BYTES < size:", "while cuts[-1] + UNIT_BYTES <= size:")
    ],
    *[
        (
            "data/prepare",
            "swap_in",
            text,
            "the old entries moved into the build folder are removed with it: their names there are never read "
            "(none of them collides with the build's own entries)",
        )
        for text in ('"XX.old-XX" + ', '".OLD-" + ')
    ],
    *[
        (
            "data/prepare",
            "pack",
            text,
            "a shared Value starts at 0 anyway, and a count of bytes or lines is never negative",
        )
        for text in ('context.Value("q", )', 'context.Value("Q", 0)')
    ],
    *[
        ("data/prepare", f, text, "codec names ignore case")
        for f, text in (
            ("plan_run", 'sources.encode("UTF-8", "surrogateescape")'),
            ("prepare_command", 'plan.sources.encode("UTF-8", "surrogateescape")'),
        )
    ],
    *[
        (
            "data/prepare",
            "plan_run",
            text,
            "the corpus is built only to open each file now (it is not kept): its sizes are never read",
        )
        for text in ("ByteCorpus(listing.files, None)", "ByteCorpus(listing.files, )")
    ],
    ("data/prepare", "plan_run", '("train", 2.0)', "only whether a split's fraction is non-zero is read"),
    (
        "data/prepare",
        "split_stats",
        '(c["dim"] or 1) // window',
        "a chunk without a size holds no window either way: 1 // window is 0 (a window is at least 2 bytes)",
    ),
    # insight/report.py (the text matches both of plot_degrees' `continue`s; the other, after an empty side, is
    # killed by test_insight_report.py: no mutant of it is left to match)
    (
        "insight/report",
        "plot_degrees",
        "                break",
        "only the initialisation side (drawn last) can be None: leaving the loop there is skipping it",
    ),
    *[
        (
            "insight/report",
            f,
            text,
            "json.dumps escapes every non-ASCII character: report.json and trajectory.json are ASCII in any encoding",
        )
        for f in ("write_report", "write_trajectory")
        for text in ("indent=1), encoding=None)", "indent=1), )", 'indent=1), encoding="UTF-8")')
    ],
    ("insight/report", "write_html", '"".join(parts), encoding="UTF-8")', "codec names ignore case"),
    ("insight/report", "plot_firing_rates", "range(4)", "zip stops at the three axes and kinds anyway"),
    (
        "insight/report",
        "plot_firing_rates",
        "                break",
        "only the initialisation side (drawn last) can be None",
    ),
    *[
        (
            "insight/report",
            "plot_firing_rates",
            text,
            "a firing rate is a share of positions, at most 1: the upper bound never clips",
        )
        for text in ("np.clip(rates, 1e-5, None)", "np.clip(rates, 1e-5, 2)")
    ],  # fmt: skip
    *[
        (
            "insight/report",
            "html_graph",
            text,
            "only a missing fit ({}) lacks at_bound, and it has no alpha either: fmt(None) is '' too",
        )
        for text in ('fit.get("at_bound", None)', 'fit.get("at_bound", )', 'fit.get("at_bound", False)')
    ],  # fmt: skip
    (
        "insight/report",
        "plot_sparsity_layers",
        "            break",
        "only the initialisation side (drawn last) can be None",
    ),
    *[
        ("insight/report", f, text, "a colour bar takes its space from its image's own axes when ax is not given")
        for f, text in (
            ("plot_sparsity_layers", "figure.colorbar(image, ax=None)"),
            ("plot_sparsity_layers", "figure.colorbar(image, )"),
            ("plot_graph_heatmap", "figure.colorbar(image, ax=None)"),
            ("plot_graph_heatmap", "figure.colorbar(image, )"),
        )
    ],
    (
        "insight/report",
        "plot_graph_heatmap",
        'interpolation="NEAREST"',
        "matplotlib reads interpolation names in any case",
    ),
    (
        "insight/report",
        "html_whole",
        "whole[1]['random_cross_head_share']",
        "random_cross_head_share is (H - 1) / H for both whole graphs (the same heads)",
    ),
    # console.py
    *[
        ("console", "quiet", text, "the module regex has no end anchor: torch(\\..*)? matches torchmetrics")
        for text in ('"XXtorchmetricsXX"', '"TORCHMETRICS"')
    ],
    *[("console", "shown", text, "codec names ignore case") for text in ('encode("UTF-8"', 'decode("UTF-8")')],
    *[
        ("console", f, "trainer.max_steps >= 0", "a max_steps of 0 is falsy: `max_steps and` already leaves it out")
        for f in ("header", "show")
    ],
    *[
        ("console", "__init__", text, "on_train_start sets it before it is read (Lightning calls it before any batch)")
        for text in ("self.last_time = None", "self.last_time = 1.0")
    ],
    *[
        ("console", "__init__", text, "read only once training started: on_train_start sets it with start_time")
        for text in ("self.start_step = None", "self.start_step = 1")
    ],
    ("console", "__init__", "self.redrawn = None", "None is falsy as False is: read only as a truth value"),
    ("console", "closing", "    last = None", "None is falsy as '' is: read only as a truth value"),
    # commands.py
    *[
        ("commands", "TextSinkǁclose", text, "texts and tails are made one per decoder: always as many")
        for text in ("tails, strict=None)", "tails, )", "tails, strict=False)")
    ],
    *[
        ("commands", f"FileSinkǁ{f}", text, "__init__ makes one part (and file) per path or raises: always as many")
        for f in ("close", "abort")
        for text in ("self.paths, strict=None)", "self.paths, )", "self.paths, strict=False)")
    ],
    ("commands", "TextSinkǁ__init__", 'getincrementaldecoder("UTF-8")', "codec names ignore case"),
    ("commands", "sampling_dtype", '"XX32XX"', "compute_dtype computes an unknown precision name in float32, as 32"),
    *[
        ("commands", "generate_command", text, CPU_ONLY)
        for text in ("load_model_from_checkpoint(source, None,", "load_model_from_checkpoint(source, settings=")
    ],
    ("commands", "generate_command", "top_p=top_p, )", "any prompt chunk size gives the same logits (tested)"),
]


def source_of(module: str) -> str:
    """The file a module name stands for, relative to the project: "kernels/chunked" -> bdh_lightning/kernels/chunked.py,
    "kernels" -> bdh_lightning/kernels/__init__.py."""
    if (REPO / "bdh_lightning" / module).is_dir():
        return f"bdh_lightning/{module}/__init__.py"
    return f"bdh_lightning/{module}.py"


def work_dir(module: str) -> Path:
    """mutants/kernels.chunked/ for kernels/chunked: one flat folder per module, so no run's folder holds another's."""
    return REPO / "mutants" / module.replace("/", ".")


def expand(names: list[str]) -> list[str]:
    """Module names as given, a package without an entry of its own replaced by every entry under it."""
    modules = []
    for name in names:
        under = [m for m in TESTS if m.startswith(name.rstrip("/") + "/")]
        if name in TESTS:
            modules.append(name)
        elif under:
            modules += under
        else:
            raise SystemExit(f"no tests are listed for {name!r}: add it to TESTS in {Path(__file__).name}")
    return modules


def write_config(work: Path, module: str) -> None:
    selection = [*TESTS[module], "-x", "-q", "-p", "no:cacheprovider", "-k", DESELECT]
    text = (REPO / "pyproject.toml").read_text()
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["bdh_lightning"]\n'
        'also_copy = ["configs"]\n'
        f'only_mutate = ["{source_of(module)}"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}\n"
        "timeout_multiplier = 5.0\n"
        # mutmut's wall limit is (estimated seconds + constant) * multiplier: with its default constant (1 s) a
        # function whose tests take milliseconds gets ~5 s, tight on this shared machine; 5 s gives ~25 s.
        "timeout_constant = 5.0\n"
    )
    (work / "pyproject.toml").write_text(text)


def prepare(module: str) -> Path:
    work = work_dir(module)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(REPO / "bdh_lightning", work / "bdh_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", work / "configs")  # tests read the shipped configs
    write_config(work, module)
    for qualified in NOT_MUTATED.get(module, []):
        skip_function(work / source_of(module), qualified.rsplit(".", 1)[-1])
    return work


def skip_function(path: Path, name: str) -> None:
    """Mark `def name(...)` with mutmut's `# pragma: no mutate block` (on the line ending its signature)."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"def {name}("))
    end = next(
        i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":") and not lines[i].lstrip().startswith("#")
    )
    lines[end] = lines[end].rstrip("\n") + "  # pragma: no mutate block\n"
    path.write_text("".join(lines))


def results(work: Path, module: str) -> dict[str, str]:
    """{mutant name: status} from mutmut's record of the run."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / f"{source_of(module)}.meta").read_text())
    # SIGABRT, which mutmut calls suspicious, is glibc stopping a process whose heap a mutant overwrote (a buffer made
    # too small for what a Triton kernel writes through its pointer): a crash, as a segfault is.
    return {
        name: "aborted" if code == -signal.SIGABRT else status_by_exit_code[code]
        for name, code in meta["exit_code_by_key"].items()
    }


KILLED = ("killed", "timeout", "segfault", "aborted")  # a timeout or crash is a test noticing the mutant too

DIFFS = """
import json, sys
from pathlib import Path
from mutmut.mutation.diff_apply import get_diff_for_mutant
names, source, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.write_text(json.dumps({name: get_diff_for_mutant(name, path=source) for name in names}))
"""


def diffs_of(work: Path, module: str, names: list[str], env: dict) -> dict[str, str]:
    """{mutant: its diff}, in one process (`mutmut show` per mutant costs an interpreter each)."""
    out = work / "diffs.json"
    subprocess.run(
        [sys.executable, "-c", DIFFS, json.dumps(names), source_of(module), str(out)],
        cwd=work,
        env=env,
        check=True,
    )
    return json.loads(out.read_text())


def why_equivalent(module: str, name: str, diff: str) -> str | None:
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    for where, function, text, why in EQUIVALENT:
        if where == module and f"{function}__mutmut_" in name and any(text in line for line in added):
            return why
    return None


def score(work: Path, module: str, env: dict) -> dict:
    statuses = results(work, module)
    unchecked = [name for name, status in statuses.items() if status == "not checked"]  # a run cut short
    statuses = {name: status for name, status in statuses.items() if status != "not checked"}
    not_killed = sorted(name for name, status in statuses.items() if status not in KILLED)
    diffs = diffs_of(work, module, not_killed, env)
    equivalent = {name: why for name in not_killed if (why := why_equivalent(module, name, diffs[name]))}
    survived = [name for name in not_killed if name not in equivalent]
    with (work / "survivors.txt").open("w") as out:
        for name in survived:
            out.write(f"# {name}: {statuses[name]}\n{diffs[name]}\n\n")
    with (work / "equivalent.txt").open("w") as out:
        for name, why in equivalent.items():
            out.write(f"# {name}: {why}\n{diffs[name]}\n\n")
    counted = len(statuses) - len(equivalent)
    killed = counted - len(survived)
    return {
        "mutants": len(statuses),
        "not_checked": len(unchecked),
        "equivalent": len(equivalent),
        "killed": killed,
        "survived": survived,
        "no_tests": sum(statuses[name] == "no tests" for name in survived),
        "score": killed / counted if counted else 1.0,
    }


def run_module(module: str, max_children: int) -> dict:
    work = prepare(module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **ENVIRONMENT.get(module, {})}
    env.pop("PYTHONPATH", None)
    mutmut = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]
    start = time.monotonic()
    log = (work / "mutmut.log").open("w")
    code = subprocess.call(
        [*mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    # Timeouts count as killed, so each is run once more, in a batch of its own. Mutants share state through
    # mutmut's fork server: in data.py's run of 2026-12-02 one mutant died holding tqdm's cross-process lock
    # and every later download test hung (131 false kills; test_data.py's `cache` fixture now avoids it).
    timeouts = [name for name, status in results(work, module).items() if status == "timeout"]
    if code == 0 and timeouts:
        code = subprocess.call(
            [*mutmut, "run", "--max-children", str(max_children), *timeouts],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    seconds = time.monotonic() - start
    if code != 0:
        print(f"{module}: mutmut exited {code}; see {work / 'mutmut.log'}", file=sys.stderr)
    summary = {"module": module, "seconds": round(seconds), **score(work, module, env)}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def report(module: str) -> dict:
    """The score of an earlier run from its records (`--report`), survivors' diffs rewritten."""
    work = work_dir(module)
    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {"seconds": 0}
    summary = {"module": module, "seconds": summary["seconds"], **score(work, module, {**os.environ})}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def markdown(rows: list[dict]) -> str:
    """The scores as docs/testing.md shows them, and the equivalent mutants with their reasons."""
    lines = [
        "| module | mutants | equivalent | killed | survived (no test reaches it) | score | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {source_of(r['module']).removeprefix('bdh_lightning/')} | {r['mutants']} | {r['equivalent']} | {r['killed']} | {len(r['survived'])} "
                     f"({r['no_tests']}) | {r['score']:.1%} | {r['seconds'] / 60:.1f} min |")  # fmt: skip
    lines.append("")
    for r in rows:
        text = (work_dir(r["module"]) / "equivalent.txt").read_text()
        for block in text.split("\n\n"):
            if block.startswith("# "):
                name, why = block.splitlines()[0][2:].split(": ", 1)
                added = [
                    line[1:].strip()
                    for line in block.splitlines()
                    if line.startswith("+") and not line.startswith("+++")
                ]
                lines.append(f"- `{name.split('.')[-1]}` → `{added[0] if added else '?'}`: {why}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TESTS), help=f"of: {' '.join(TESTS)} (default: all)")
    parser.add_argument(
        "--max-children", type=int, default=1, help="mutants tested at once (1 on a shared 2-core machine)"
    )
    parser.add_argument(
        "--report", action="store_true", help="only print the scores of the last run (after EQUIVALENT edits)"
    )
    parser.add_argument("--markdown", action="store_true", help="the table and equivalents for docs/testing.md")
    args = parser.parse_args()
    rows = [report(m) if args.report else run_module(m, args.max_children) for m in expand(args.modules)]
    if args.markdown:
        print(markdown(rows))
        return
    print(
        f"{'module':<12} {'mutants':>7} {'equiv.':>6} {'killed':>6} {'survived':>8} {'(no test)':>9} "
        f"{'score':>6} {'time':>7}"
    )
    for r in rows:
        if r["not_checked"]:
            print(f"{r['module']}: {r['not_checked']} mutants not checked yet (a run cut short): scored without them")
        print(
            f"{r['module']:<12} {r['mutants']:>7} {r['equivalent']:>6} {r['killed']:>6} {len(r['survived']):>8} "
            f"{r['no_tests']:>9} {r['score']:>6.1%} {r['seconds'] / 60:>6.1f}m"
        )


if __name__ == "__main__":
    main()
