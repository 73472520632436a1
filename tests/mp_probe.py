"""The worker the multi-process tests launch (torchrun, accelerate launch): `train_network.run` with test hooks.

- Every process prints `rank R pid P` as it starts and, before the final files, `rank R weights <sha256>` of its
  LoRA weights, so a test can compare the weights of every process.
- `MP_PROBE_SLOW_STATE_RANK=N`: process N waits 1 s before writing its part of each state (the main process used to
  rename the state folder into place before the other processes had written their RNG files).
- `MP_PROBE_STEP_SECONDS=S`: every optimizer step takes S seconds longer, so a test can signal a run mid-way.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate  # noqa: E402
import torch  # noqa: E402

import library.train.loop as loop  # noqa: E402
import library.train.trainer as trainer  # noqa: E402
import train_network  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def weights_digest(network: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def install_hooks() -> None:
    real_finish = trainer.finish

    def finish(cfg, parts, state, phase):
        print(f"rank {RANK} weights {weights_digest(parts.network)}", flush=True)
        return real_finish(cfg, parts, state, phase)

    trainer.finish = finish
    if os.environ.get("MP_PROBE_SLOW_STATE_RANK") == str(RANK):
        real_save = accelerate.Accelerator.save_state

        def slow_save(self, *args, **kwargs):
            time.sleep(1)
            return real_save(self, *args, **kwargs)

        accelerate.Accelerator.save_state = slow_save
    seconds = float(os.environ.get("MP_PROBE_STEP_SECONDS", "0"))
    if seconds:
        real_after_step = loop.after_step

        def slow_after_step(*args, **kwargs):
            time.sleep(seconds)
            return real_after_step(*args, **kwargs)

        loop.after_step = slow_after_step


if __name__ == "__main__":
    print(f"rank {RANK} pid {os.getpid()}", flush=True)
    install_hooks()
    sys.exit(train_network.run(sys.argv[1:]))
