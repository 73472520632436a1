# Two commands on a fresh machine: `make demo` (train the seed command on a tiny SDXL) and `make test`.
# For the inner loop: `make test-fast` (all but the `slow` tests) and `make lint` (ruff, as CI runs it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo_out

.PHONY: install test test-fast lint format demo clean

install: $(VENV)/.installed

# CPU torch is pinned to the local 2.13.0 wheel (an unpinned torch pulls a multi-GB CUDA build);
# everything else is pinned by constraints-cpu.txt. requirements.txt keeps wide ranges for CUDA users.
$(VENV)/.installed: requirements.txt constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints-cpu.txt -r requirements.txt pytest peft ruff
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The seed command (see README) with its four paths pointed at a tiny random SDXL and a generated dataset.
demo: install
	$(PY) tools/make_tiny_sdxl.py $(DEMO)/model
	$(PY) tools/make_demo_dataset.py $(DEMO)/dataset
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu.yaml --num_cpu_threads_per_process 1 \
	  sdxl_train_network.py --pretrained_model_name_or_path "$(DEMO)/model/tiny_sdxl.safetensors" \
	  --train_data_dir "$(DEMO)/dataset" --output_dir "$(DEMO)/output" --network_module "networks.lora" --xformers \
	  --gradient_checkpointing --persistent_data_loader_workers --cache_latents --cache_latents_to_disk \
	  --max_data_loader_n_workers 1 --enable_bucket --save_model_as "safetensors" --lr_scheduler_num_cycles 4 \
	  --mixed_precision "fp16" --learning_rate 0.0001 --resolution 1024 --train_batch_size 2 --max_train_epochs 14 \
	  --network_dim 4 --network_alpha 1 --shuffle_caption --keep_tokens 1 --optimizer_type "Lion" \
	  --lr_warmup_steps 100 --output_name "utaha_xl_loraplus" --save_precision "fp16" \
	  --lr_scheduler "cosine_with_restarts" --min_bucket_reso 512 --max_bucket_reso 2048 --caption_extension ".txt" \
	  --seed 42 --logging_dir "$(DEMO)/logs" --fp8_base --loraplus_lr_ratio 16 --save_every_n_epochs 2

clean:
	rm -rf $(DEMO)
