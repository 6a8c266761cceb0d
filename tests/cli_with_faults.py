"""`python -m qlora.cli` with faults injected into qlora's own code (never into torch, peft or
bitsandbytes), for tests that must kill or signal a real process at a known moment.

    QLORA_TEST_STEP_DELAY=0.5        sleep this long in every micro-batch's forward
    QLORA_TEST_HANG_IN_SAVE=4        at the step-4 checkpoint, write the state, touch
                                     $QLORA_TEST_READY, then hang (so the test can kill -9 mid-save)
    QLORA_TEST_NAN_AT_STEP=3         the loss of step 3 is NaN
    QLORA_TEST_FORWARD_MARK=PATH     write the count of training forwards begun to PATH as each begins
                                     (before its delay: a test knows a forward is under way)
    QLORA_TEST_DUMP_WEIGHTS=DIR      after the loop, every rank writes its trainable weights to
                                     DIR/rank-$RANK.safetensors (are the replicas identical?)
    QLORA_TEST_FILL_DISK=step-4      just before the step-4 checkpoint's adapter (or `final`: the
                                     finished adapter) is written, fill the disk with the file
                                     $QLORA_TEST_FILLER until it is full (a real ENOSPC follows)
"""

import os
import sys
import time
from pathlib import Path

import qlora.job.artifacts
import qlora.job.run
import qlora.training.checkpoint
import qlora.training.loop
from qlora.cli.main import main

delay = float(os.environ.get("QLORA_TEST_STEP_DELAY", "0"))
hang_at = int(os.environ.get("QLORA_TEST_HANG_IN_SAVE", "0"))
nan_at = int(os.environ.get("QLORA_TEST_NAN_AT_STEP", "0"))
forward_mark = os.environ.get("QLORA_TEST_FORWARD_MARK")
real_summed_loss = qlora.training.loop.summed_loss
real_save_state = qlora.training.checkpoint.save_training_state
dump_dir = os.environ.get("QLORA_TEST_DUMP_WEIGHTS")
real_run_loop = qlora.job.run.run_loop
real_save_adapter = qlora.job.artifacts.save_adapter
fill_at = os.environ.get("QLORA_TEST_FILL_DISK")
forward_calls = 0


def summed_loss(model, batch, device, *chunking):
    global forward_calls
    forward_calls += 1 if model.training else 0
    if forward_mark and model.training:
        Path(forward_mark).write_text(str(forward_calls))
    time.sleep(delay)
    loss = real_summed_loss(model, batch, device, *chunking)
    # Micro-batches of step s are forward calls (s-1)*accum+1 .. s*accum; accum is 1 in these tests.
    return loss * float("nan") if model.training and forward_calls == nan_at else loss


def save_training_state(folder, state, run):
    real_save_state(folder, state, run)
    if state.step == hang_at:
        Path(os.environ["QLORA_TEST_READY"]).write_text(str(folder))
        time.sleep(600)


def save_adapter(model, folder, *rest, **named):
    staged = Path(folder).name  # .tmp-step-00000004-... for a checkpoint, .artifacts-... for the finished adapter
    if fill_at and staged.startswith(".artifacts-" if fill_at == "final" else f".tmp-step-{int(fill_at[5:]):08d}-"):
        with open(os.environ["QLORA_TEST_FILLER"], "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * (1 << 16))
                    filler.flush()
            except OSError:
                pass
    return real_save_adapter(model, folder, *rest, **named)


def run_loop(placed, *rest, **named):
    result = real_run_loop(placed, *rest, **named)
    model = placed.model
    if dump_dir:
        from safetensors.torch import save_file

        weights = {name: value.detach().contiguous() for name, value in model.named_parameters() if value.requires_grad}
        save_file(weights, str(Path(dump_dir) / f"rank-{os.environ.get('RANK', '0')}.safetensors"))
    return result


qlora.training.loop.summed_loss = summed_loss
qlora.job.run.run_loop = run_loop
qlora.job.artifacts.save_training_state = save_training_state
qlora.job.artifacts.save_adapter = save_adapter

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
