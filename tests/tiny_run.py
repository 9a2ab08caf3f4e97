"""Command-line arguments for a tiny BDH run, shared by the tests that train through the CLI."""

TINY_ARGS = [
    "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
    "--model.mlp_internal_dim_multiplier", "8", "--model.learning_rate", "3e-3",
    "--data.block_size", "32", "--data.batch_size", "8", "--data.val_windows", "8",
    "--trainer.val_check_interval", "5", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip
