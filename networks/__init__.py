"""The LoRA network, where sd-scripts users look for it (`--network_module networks.lora`): the network and its
sd-scripts API (`lora`: `create_network`, `create_network_from_weights`, `prepare_optimizer_params`, save/load),
one adapter (`lora_module`), which layers get one and their sd-scripts names (`lora_targets`), the LoRA+ grouping
rule (`loraplus`), `--network_args` and the LoRA+ ratios (`network_args`), block-wise weights, ranks and alphas
(`block_weights`), a LoRA's size from tensor names alone (`lora_size`) and the diffusers <-> original key tables
(`sdxl_keys`). May import `library.errors` and `library.files` (writing LoRA files); `sdxl_keys` imports nothing of
ours, since `library.files` stands on it."""
