"""The run: the trainer (`trainer`: set-up from config slices, then the loop), loss and noise (`loss`,
`loss_options`), optimizers and schedules (`optim`, `optimizer_names`), resumable state (`train_state`), EMA
(`ema`), validation (`validation`), sample prompts and images (`sample_prompts`, `sampling`), checkpoints and
their `ss_*` metadata (`saving`, `metadata`), the run report (`run_report`), trackers (`trackers`), LoRA+
diagnostics (`diagnostics`), signals (`interrupts`) and the process's malloc set-up (`allocator`). May import
`data`, `model`, `report`, `files`, `networks`, and `library.config.build` for the config dataclasses only
(`config`'s builders import this wing for slices and checks)."""
