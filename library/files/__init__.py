"""File formats and safe writing, the wing everything else stands on: atomic writes and folder replaces with
one-line errors for full disks (`atomic`), reading safetensors headers and weight files tensor by tensor
(`weight_files`), LoRA files (`lora_io`) and merging them into a model
(`lora_merge`), TOML (`toml_io`), NaN/inf checks before a write (`finite`), output-folder and free-space checks
(`output_checks`), the one-run-per-output lock (`run_lock`) and the temporaries a killed run left
(`stale_files`). May import only `library.errors` and `networks`' key tables (`networks.sdxl_keys`)."""
