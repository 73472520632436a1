"""The frozen SDXL base: loading a single file or diffusers folder offline, tensor by tensor (`loading`), checking
its files before loading (`model_files`), the precision plan and its config slice (`precision`), fp8/fp16 weight
storage with per-layer up-cast (`fp8`), caption encoding (`text_encoding`), and preparing the loaded parts for
training (`base_models`: freezing, placement, attention, checkpointing, release). May import `library.errors`,
`library.files` and `networks.sdxl_keys`; never `data`, `train` or `config`."""
