"""The run: the recipe and its in-process API (`trainer`: `train(cfg, on_step=...) -> TrainResult`), which sets up
the fixed parts from config slices (`setup_parts`, `parts`), runs the loop (`loop`) of optimizer steps (`step`)
and writes checkpoints (`checkpoints`); loss and noise (`loss`, `loss_options`), optimizers and schedules (`optim`,
`optimizer_names`), resumable state (`train_state`), EMA (`ema`), validation (`validation`), sample prompts and
images (`sample_prompts`, `sampling`), file names and rotation and the `ss_*` metadata (`saving`, `metadata`), the
run report (`run_report`), trackers (`trackers`), signals (`interrupts`) and the process's malloc set-up
(`allocator`). May import `data`, `model`, `files`, `networks`, and `library.config.build` for the config
dataclasses only (`config`'s builders import this wing for slices and checks)."""
