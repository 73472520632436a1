"""Everything behind `train_network.py` but the LoRA network itself (that is `networks/`, where sd-scripts users
look for it), in wings that follow one run from the command line to the files it writes:

    config/  the command line, --config_file TOML, and the typed frozen config built from them (the entry layer)
    data/    images, captions, buckets, the dataset TOML, and the latent / text-encoder caches
    model/   loading SDXL offline, weight storage and precision (fp8), text encoding, preparing the frozen base
    train/   the run: recipe and loop, loss, optimizers and schedules, state and resume, EMA, validation,
             samples, checkpoints and their metadata, the run report, LoRA+ diagnostics, trackers, signals
    report/  seeing a run: the HTML run report and the comparison of runs, read from the report JSON's history,
             the sample images or TensorBoard logs (matplotlib figures, self-contained pages; no torch)
    files/   file formats and safe writing: atomic writes, safetensors headers and weight files, LoRA files and
             merging, TOML, the output lock, output-folder checks, stale temporaries, finite checks

Imports go down this list and never up: `config` may import every wing; `train` imports `data`, `model`, `report`,
`files` and `networks` (never `config`: the run's typed configuration is `train.run_config`); `data`, `model` and
`report` import `files`; `files` imports only `library.errors` and `networks.sdxl_keys`. `errors.py` (one-line
errors and exit codes) and `sdscripts_options.py` (the sd-scripts options we lack, with their defaults) are leaves
any wing may import.
"""
