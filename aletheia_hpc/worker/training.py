"""LoRA training of one cell with the Hugging Face Trainer, plus what the paper's protocol needs on top:
per-step wall times, an immediate stop on a non-finite loss, time accounting across requeued
attempts, a checkpoint on demand (preemption), and the number of layers backward actually ran
through in the first step (the truncation guard)."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from aletheia_hpc.campaign.store import CHECKPOINT_DIR, PROGRESS_FILE
from aletheia_hpc.config import FaultConfig, TrainConfig
from aletheia_hpc.method.checkpointing import BackwardLayerCounter
from aletheia_hpc.method.families import FamilySpec
from aletheia_hpc.worker.stop import StopSignal


class NonFiniteLoss(FloatingPointError):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite training loss {value} at optimizer step {step}")
        self.step = step


class StopForRequeue(Exception):
    """Training stopped after saving a checkpoint because the scheduler asked (preemption/time)."""


@dataclass
class TrainOutcome:
    steps: int
    step_times_s: list[float]
    final_train_loss: float | None
    step_hardware: list[str] = field(default_factory=list)  # what timed each step (GPU name or cpu)
    backward_layers: int | None = None  # layers whose output got an activation gradient in step 1

    @property
    def hardware(self) -> list[str]:
        """The distinct kinds of hardware the steps were timed on (several after a requeue that
        landed elsewhere)."""
        return sorted(set(h for h in self.step_hardware if h))

    @property
    def train_time_s(self) -> float:
        return float(sum(self.step_times_s))

    @property
    def step_time_median_s(self) -> float | None:
        return statistics.median(self.step_times_s) if self.step_times_s else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CellTrainer(Trainer):
    """Trainer that raises on the first non-finite micro-batch loss and can inject one for tests."""

    def __init__(self, *args, faults: FaultConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self._faults = faults

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = result[0] if return_outputs else result
        step = self.state.global_step + 1
        if self._faults.nan_at_step and step >= self._faults.nan_at_step:
            loss = loss * float("nan")
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLoss(step, float(loss.detach().float().mean()))
        return (loss, result[1]) if return_outputs else loss


class _Clock(TrainerCallback):
    """Per-optimizer-step wall times, kept in progress.json after every step (so a checkpoint never
    holds more steps than the file has times); honours stop requests; checkpoints the last step, so
    that a stop or a kill during evaluation never costs the training. The first step also counts
    the layers backward reaches (``backward_counter``), kept in progress.json for later attempts."""

    def __init__(self, device, progress_path: Path, prior: "_Progress", stop: StopSignal, faults: FaultConfig,
                 backward_counter: BackwardLayerCounter | None = None):
        self.device, self.progress_path, self.stop, self.faults = device, progress_path, stop, faults
        self.step_times, self.step_hardware = list(prior.step_times), list(prior.step_hardware)
        self.backward_layers = prior.backward_layers
        self._counter = backward_counter if prior.backward_layers is None else None
        self.hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.losses: list[float] = []
        self._t0 = 0.0
        self.stopped_for_requeue = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self._counter is not None:
            self._counter.__enter__()
        _sync(self.device)
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.faults.sleep_per_step_s:
            time.sleep(self.faults.sleep_per_step_s)  # counts as step time: it stands in for work
        _sync(self.device)
        self.step_times.append(time.perf_counter() - self._t0)
        self.step_hardware.append(self.hardware)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.backward_layers, self._counter = self._counter.count, None
        self._write_progress(state.global_step)
        if state.global_step >= args.max_steps:
            control.should_save = True
        if self.stop.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_for_requeue = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def _write_progress(self, step: int) -> None:
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "step_times_s": self.step_times[:step],
                                   "step_hardware": self.step_hardware[:step],
                                   "backward_layers": self.backward_layers}))
        tmp.replace(self.progress_path)


def _checkpoint_step(checkpoint: str) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


@dataclass
class _Progress:
    step_times: list[float]
    step_hardware: list[str]
    backward_layers: int | None = None


def _prior_progress(checkpoint: str | None, progress_path: Path) -> _Progress:
    """The times (and hardware) of the steps ``checkpoint`` holds, from progress.json; an error if
    they are missing (the row's train time would silently undercount)."""
    if checkpoint is None:
        return _Progress([], [])
    step = _checkpoint_step(checkpoint)
    saved = json.loads(progress_path.read_text()) if progress_path.exists() else {"step_times_s": []}
    if len(saved["step_times_s"]) < step:
        raise RuntimeError(f"{progress_path} has the times of {len(saved['step_times_s'])} steps but "
                           f"{Path(checkpoint).name} holds {step}: the train time cannot be accounted; "
                           "rerun the cell from scratch (resubmit --force)")
    hardware = saved.get("step_hardware", [])[:step]
    return _Progress(saved["step_times_s"][:step], hardware + [""] * (step - len(hardware)),
                     saved.get("backward_layers"))


def train_cell(model, tokenizer, train_examples, collator, train_cfg: TrainConfig, *, lr: float,
               batch_size: int, precision: str, seed: int, work_dir: Path, device: torch.device,
               stop: StopSignal, faults: FaultConfig, progress: bool,
               family: FamilySpec | None = None) -> TrainOutcome:
    """Train ``model`` (a peft model) for train_cfg.steps optimizer steps, resuming from the newest
    checkpoint in work_dir. Raises NonFiniteLoss, or StopForRequeue after checkpointing on request.
    With ``family``, the outcome's backward_layers counts the layers backward reached in step 1."""
    checkpoints = work_dir / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    progress_path = work_dir / PROGRESS_FILE
    resume = get_last_checkpoint(str(checkpoints))
    counter = BackwardLayerCounter(model, family) if family is not None else None
    clock = _Clock(device, progress_path, _prior_progress(resume, progress_path), stop, faults, counter)
    if resume is not None and _checkpoint_step(resume) >= train_cfg.steps:
        return _finished_outcome(model, resume, clock)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=train_cfg.steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=train_cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=train_cfg.scheduler,
        warmup_steps=train_cfg.warmup_steps,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_epsilon=train_cfg.adam_eps,
        max_grad_norm=train_cfg.max_grad_norm,
        # mixed precision on the GPU: bf16 autocast, or fp16 autocast with dynamic loss scaling
        # (accelerate's GradScaler); fp16 on a CPU is refused before loading (models/loading.py)
        bf16=precision == "bf16" and device.type == "cuda",
        fp16=precision == "fp16",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN must be seen, not averaged away
        save_strategy="steps" if train_cfg.checkpoint_every else "no",
        save_steps=train_cfg.checkpoint_every or 1,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=device.type == "cpu",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = _CellTrainer(model=model, args=args, train_dataset=train_examples, data_collator=collator,
                           callbacks=[clock], faults=faults)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:  # a step that raised leaves the counter's hooks on the model otherwise
        if counter is not None:
            counter.__exit__(None, None, None)
    if clock.stopped_for_requeue and trainer.state.global_step < train_cfg.steps:
        raise StopForRequeue(f"checkpointed at step {trainer.state.global_step} for requeue")
    final = clock.losses[-1] if clock.losses else None
    return TrainOutcome(steps=trainer.state.global_step, step_times_s=clock.step_times,
                        step_hardware=clock.step_hardware, backward_layers=clock.backward_layers,
                        final_train_loss=final if final is None or math.isfinite(final) else None)


def _finished_outcome(model, checkpoint: str, clock: _Clock) -> TrainOutcome:
    """Training was complete at ``checkpoint`` (an earlier attempt stopped during evaluation): load its
    adapters and report it. The Trainer itself would train one step past max_steps on such a resume."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    final = float(losses[-1]) if losses else None
    return TrainOutcome(steps=_checkpoint_step(checkpoint), step_times_s=clock.step_times,
                        step_hardware=clock.step_hardware, backward_layers=clock.backward_layers,
                        final_train_loss=final if final is None or math.isfinite(final) else None)


@torch.no_grad()
def held_out_loss(model, examples, collator, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean cross-entropy over the held-out examples (response tokens only)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                     shift_labels.reshape(-1), ignore_index=-100,
                                                     reduction="sum")
            total += float(loss)
            tokens += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("held-out split has no response tokens")
    return total / tokens
