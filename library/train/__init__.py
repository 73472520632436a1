"""The run: its typed configuration (`run_config`), the recipe and its in-process API (`trainer`: `train(cfg,
on_step=...) -> TrainResult`), which sets up the fixed parts from config slices (`setup_parts`, `parts`), runs the
loop (`loop`) of optimizer steps (`step`) and writes checkpoints (`checkpoints`); the loss options and the noise
and loss maths (`loss`), optimizers and schedules by sd-scripts' names (`optim`), resumable state (`train_state`),
EMA (`ema`), validation (`validation`), sample prompts and images (`sampling`), file names and rotation and the
`ss_*` metadata (`saving`, `metadata`), the run report (`run_report`), LoRA+ diagnostics (`diagnostics`), trackers
(`trackers`), signals (`interrupts`), the process's malloc set-up (`allocator`) and the only reach into private
parts of accelerate and torch (`accelerate_compat`). May import `data`, `model`, `report`, `files` and `networks`;
never `library.config`, whose builders import this wing for its slices and checks. Across processes the step's
gradients are averaged in a few bucketed collectives (`grad_sync`)."""
