"""LoRA training of one cell with the Hugging Face Trainer, plus what the paper's protocol needs on top:
per-step wall times, an immediate stop on a non-finite loss, time accounting across requeued
attempts, a checkpoint on demand (preemption), the number of layers backward actually ran
through in the first step (the truncation guard), the learning curve (held-out loss every
``train.eval_every`` steps) and the backward-drop mask of each step (recipe drop_backward)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from aletheia_hpc.campaign.store import CHECKPOINT_DIR, PROGRESS_FILE, unique_stamp
from aletheia_hpc.files import atomic_write
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
    warnings: list[str] = field(default_factory=list)  # e.g. a damaged checkpoint that was set aside
    backward_layers: int | None = None  # layers whose output got an activation gradient in step 1
    curve: list[dict] = field(default_factory=list)  # [{step, train_time_s, eval_loss}] (row.curve)

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
    the layers backward reaches (``backward_counter``), kept in progress.json for later attempts.
    With ``curve_loss``, the held-out loss at step 0, every ``eval_every`` steps and the last one,
    outside the timed span, also kept in progress.json (a resumed attempt keeps the points up to its
    checkpoint)."""

    def __init__(self, device, progress_path: Path, prior: "_Progress", stop: StopSignal, faults: FaultConfig,
                 backward_counter: BackwardLayerCounter | None = None,
                 curve_loss: Callable[[], float] | None = None, eval_every: int = 0):
        self.device, self.progress_path, self.stop, self.faults = device, progress_path, stop, faults
        self.step_times, self.step_hardware = list(prior.step_times), list(prior.step_hardware)
        self.curve, self.curve_loss, self.eval_every = list(prior.curve), curve_loss, eval_every
        self.backward_layers = prior.backward_layers
        self._counter = backward_counter if prior.backward_layers is None else None
        self.hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.losses: list[float] = []
        self._t0 = 0.0
        self.stopped_for_requeue = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.curve_loss is not None and not self.curve:
            self._curve_point(0)

    def _curve_point(self, step: int) -> None:
        self.curve.append({"step": step, "train_time_s": float(sum(self.step_times[:step])),
                           "eval_loss": float(self.curve_loss())})

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
        step = state.global_step
        if self.curve_loss is not None and (step % self.eval_every == 0 or step >= args.max_steps):
            self._curve_point(step)
        self._write_progress(step)
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
        atomic_write(self.progress_path, json.dumps({"step": step, "step_times_s": self.step_times[:step],
                                                     "step_hardware": self.step_hardware[:step],
                                                     "backward_layers": self.backward_layers,
                                                     "curve": [p for p in self.curve if p["step"] <= step]}),
                     fsync=False)


class _DropMask(TrainerCallback):
    """Sets the backward-drop mask of each optimizer step (a BackwardDropper's plan) for its micro-batches."""

    def __init__(self, dropper):
        self.dropper = dropper

    def on_step_begin(self, args, state, control, **kwargs):
        self.dropper.set_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.dropper.set_step(None)


# Written into a checkpoint once the Trainer has saved all of it: its files' sizes and sha256. A
# checkpoint without it (killed mid-save) or whose files differ (truncated, damaged) is not resumed.
CHECKPOINT_MANIFEST = "aletheia-manifest.json"


def _file_digests(checkpoint: Path) -> dict[str, list]:
    out = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        out[str(path.relative_to(checkpoint))] = [path.stat().st_size, digest.hexdigest()]
    return out


class _Manifest(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        atomic_write(checkpoint / CHECKPOINT_MANIFEST, json.dumps(_file_digests(checkpoint)))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None."""
    try:
        expected = json.loads((checkpoint / CHECKPOINT_MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest: it was not completely saved"
    actual = _file_digests(checkpoint)
    for name, (size, sha) in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name][0] != size:
            return f"{name} has {actual[name][0]} bytes, {size} were saved"
        if actual[name][1] != sha:
            return f"{name} differs from what was saved"
    return None


def _checkpoint_step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


@dataclass
class _Progress:
    step_times: list[float]
    step_hardware: list[str]
    backward_layers: int | None = None
    curve: list[dict] = field(default_factory=list)


def _saved_progress(progress_path: Path) -> dict:
    try:
        saved = json.loads(progress_path.read_text())
        return saved if isinstance(saved.get("step_times_s"), list) else {"step_times_s": []}
    except (OSError, ValueError, AttributeError):
        return {"step_times_s": []}


def _resume_point(checkpoints: Path, progress_path: Path, warnings: list[str]) -> tuple[str | None, _Progress]:
    """The newest checkpoint that is intact and whose steps' times progress.json holds (else the row's
    train time would undercount), with those times. Every newer one is set aside (renamed
    ``damaged-<name>-<time>``, never deleted) with a warning, so that a damaged checkpoint never
    sticks the cell; with none left the cell trains from scratch."""
    saved = _saved_progress(progress_path)
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=_checkpoint_step, reverse=True)
    for checkpoint in found:
        step = _checkpoint_step(checkpoint)
        problem = checkpoint_problem(checkpoint)
        if problem is None and len(saved["step_times_s"]) < step:
            problem = f"{progress_path.name} has the times of {len(saved['step_times_s'])} steps, it holds {step}"
        if problem is None:
            hardware = saved.get("step_hardware", [])[:step]
            curve = [p for p in saved.get("curve", []) if p["step"] <= step]
            return str(checkpoint), _Progress(saved["step_times_s"][:step], hardware + [""] * (step - len(hardware)),
                                              saved.get("backward_layers"), curve)
        aside = checkpoint.with_name(f"damaged-{checkpoint.name}-{unique_stamp()}")
        checkpoint.rename(aside)
        warnings.append(f"checkpoint {checkpoint.name} not resumed ({problem}); kept as {aside.name}")
    if found:
        warnings.append("no usable checkpoint left: trained from scratch")
    return None, _Progress([], [])


TRACKING_DIR = "tracking"


def _tracking(report_to: str, work_dir: Path) -> str:
    """Point the tracker's files into the cell's directory (wandb offline: compute nodes often have
    no network; ``wandb sync`` uploads later) and return the Trainer's report_to."""
    if report_to == "none":
        return "none"
    out = (work_dir / TRACKING_DIR).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {"tensorboard": {"TENSORBOARD_LOGGING_DIR": str(out / "tensorboard")},
           "wandb": {"WANDB_MODE": "offline", "WANDB_DIR": str(out)},
           "mlflow": {"MLFLOW_TRACKING_URI": (out / "mlruns").as_uri()}}[report_to]
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return report_to


def train_cell(model, tokenizer, train_examples, collator, train_cfg: TrainConfig, *, lr: float,
               batch_size: int, precision: str, seed: int, work_dir: Path, device: torch.device,
               stop: StopSignal, faults: FaultConfig, progress: bool,
               family: FamilySpec | None = None, optimizer: torch.optim.Optimizer | None = None,
               drop=None, curve_loss: Callable[[], float] | None = None) -> TrainOutcome:
    """Train ``model`` (a peft model) for train_cfg.steps optimizer steps, resuming from the newest
    checkpoint in work_dir. Raises NonFiniteLoss, or StopForRequeue after checkpointing on request.
    With ``family``, the outcome's backward_layers counts the layers backward reached in step 1.
    ``optimizer``: the one to train with (method/step.py's lora_optimizer; None: the Trainer's own,
    the same kind); ``lr`` sets its schedule's peak. ``drop``: a BackwardDropper whose plan gives each
    step's mask. ``curve_loss``: the held-out loss, for the curve every train_cfg.eval_every steps."""
    checkpoints = work_dir / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    progress_path = work_dir / PROGRESS_FILE
    warnings: list[str] = []
    resume, prior = _resume_point(checkpoints, progress_path, warnings)
    counter = BackwardLayerCounter(model, family) if family is not None else None
    clock = _Clock(device, progress_path, prior, stop, faults, counter, curve_loss if train_cfg.eval_every else None,
                   train_cfg.eval_every)
    if resume is not None and _checkpoint_step(resume) >= train_cfg.steps:
        outcome = _finished_outcome(model, resume, clock)
        outcome.warnings = warnings
        return outcome
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
        save_total_limit=2,  # the previous checkpoint stays until the next one is saved whole
        report_to=_tracking(train_cfg.report_to, work_dir),
        run_name=work_dir.name,  # the cell id
        seed=seed,
        data_seed=seed,
        use_cpu=device.type == "cpu",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    callbacks = [clock, _Manifest()] + ([_DropMask(drop)] if drop is not None else [])
    trainer = _CellTrainer(model=model, args=args, train_dataset=train_examples, data_collator=collator,
                           callbacks=callbacks, faults=faults, optimizers=(optimizer, None))
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
                        final_train_loss=final if final is None or math.isfinite(final) else None,
                        warnings=warnings, curve=clock.curve)


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
                        final_train_loss=final if final is None or math.isfinite(final) else None,
                        curve=clock.curve)


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
