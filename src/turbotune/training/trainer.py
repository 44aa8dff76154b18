"""The training loop behind `turbotune train`.

Why our own loop rather than transformers.Trainer: it is short enough to read, and it makes the promises
of the product easy to keep and to test — atomic checkpoints, exact resume (optimizer, scheduler, RNG and
data order), a checkpoint on Ctrl-C/SIGTERM, a clear stop on a non-finite loss or an out-of-memory. The
models it trains still work in transformers' Trainer and TRL's SFTTrainer (tests/test_trainer_compat.py).

Gradient accumulation divides the summed token losses of all micro-batches of a step by the number of
target tokens in the whole step (`num_items_in_batch`), so a step equals one big batch. Under torchrun the
ranks share the data and add their gradients once per step (training/distributed.py): the step then equals
one process's with N× the micro-batch. With --fsdp they also shard the model (training/fsdp.py).
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbotune.training import checkpoints as ckpt
from turbotune._compat import unwrap_peft
from turbotune.errors import ConfigError, TrainingStopped
from turbotune.training.config import TrainConfig, check_values, dump, identity_of
from turbotune.training.distributed import init_from_env
from turbotune.model.state import turbo_state
from turbotune.training.log import LogTable, memory_now, plot_losses, write_log


@dataclass
class TrainResult:
    steps: int
    history: list[dict]
    output_dir: Path
    last_checkpoint: Path | None
    skipped_nonfinite: int = 0
    interrupted: bool = False
    summary: dict = field(default_factory=dict)


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:  # `step` = optimizer steps already taken
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def oom_message(cfg: TrainConfig, step: int, longest: int, four_bit: bool | None = None) -> str:
    """four_bit: whether the loaded base is 4-bit (a `*-bnb-4bit` folder is, without --load-in-4bit)."""
    four_bit = cfg.load_in_4bit if four_bit is None else four_bit
    return (f"out of GPU memory at step {step}: micro-batch {cfg.batch_size} × sequence length up to "
            f"{cfg.max_seq_length} (longest in this batch: {longest}), 4-bit base: "
            f"{'yes' if four_bit else 'no'}, gradient checkpointing: "
            f"{checkpointing_label(cfg.gradient_checkpointing)}. To fit, try (in this order): "
            f"--batch-size {max(1, cfg.batch_size // 2)} --grad-accum {cfg.grad_accum * 2} (same effective batch); "
            f"--max-seq-length {max(64, cfg.max_seq_length // 2)}; "
            + ("" if four_bit else "--load-in-4bit; ")
            + ("" if cfg.gradient_checkpointing else "gradient checkpointing on; ")
            + "a smaller --lora-r. Checkpoints already written are intact; --resume continues from the last one.")


def checkpointing_label(mode) -> str:
    return ("on" if mode else "off") if isinstance(mode, bool) else str(mode)


class _SignalGuard:
    """First SIGINT/SIGTERM: finish the current step, save, stop. A second one stops at once."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n[turbotune] {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(press again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def auto_packing(model, device: torch.device) -> tuple[bool, str]:
    """The default: pack on a GPU when the model's attention keeps packed samples apart; not on the CPU,
    where a packed row's attention over all of max_seq_length costs more than the padding it saves."""
    if device.type != "cuda":
        return False, "CPU run"
    from turbotune.training.packing import PackingError, packing_attention_mode
    try:
        return True, f"auto: attention keeps samples apart via {packing_attention_mode(model)}"
    except PackingError as exc:
        return False, f"auto: {exc}"


class Trainer:
    """Train the LoRA adapters of `model` on tokenized samples (see data.prepare_dataset)."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_dataset: list[dict], progress: bool | None = None,
                 stream=None):
        if not train_dataset:
            raise ConfigError("the training dataset is empty")
        self.cfg, self.model, self.tokenizer, self.data = cfg, model, tokenizer, train_dataset
        self.out = Path(cfg.output_dir)
        self.device = next(p for p in model.parameters()).device
        self.world = init_from_env(self.device)  # one process unless torchrun started this one
        self.stream = self.world.quiet(stream or sys.stdout)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.world.is_main
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters; add LoRA with FastModel.get_peft_model first")
        self.world.broadcast_(params)
        self.sharded = None  # FSDP2: the model split over the ranks (fsdp.py), its LoRA tensors then DTensors
        if cfg.distributed == "fsdp" and self.world.enabled:
            from turbotune.training.fsdp import ShardedModel
            self.sharded = ShardedModel(model)
            self._say(self.sharded.line())
            params = [p for p in model.parameters() if p.requires_grad]  # fully_shard's DTensor parameters
        elif cfg.distributed == "fsdp":
            self._say("--fsdp: one process, nothing to shard")
        self.params = params
        # The units a micro-batch is drawn from: samples (padded per batch) or packed rows of samples.
        if cfg.packing is None:
            cfg.packing, why = auto_packing(model, self.device)
            self._say(f"packing: {'on' if cfg.packing else 'off'} ({why}; --packing / --no-packing to choose)")
        # CUDA graphs want one shape: packed rows padded to max_seq_length give it. Padded micro-batches change
        # shape from batch to batch, and each new shape would run eagerly beside the graphs' memory pool.
        from turbotune.training.cuda_graphs import GraphedMicroStep
        self.micro = GraphedMicroStep(model, params, enabled=cfg.cuda_graphs)
        if self.micro.active and self.sharded is not None:
            self.micro.disable("FSDP2 gathers and frees the weights from module hooks, which a graph would skip")
        if self.micro.active and not cfg.packing:
            self.micro.disable("padded micro-batches change shape; --packing gives every step one shape")
        if cfg.packing:
            from turbotune.training.packing import TRAIN_LOOKAHEAD, PackingCollator, pack_samples, packing_stats
            order = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            self.units = pack_samples([train_dataset[i] for i in order], cfg.max_seq_length, lookahead=TRAIN_LOOKAHEAD)
            # With CUDA graphs: every row padded to max_seq_length (one shape, one graph), and a document mask
            # that nothing waits on the host to build (PackingCollator.for_model, no_host_sync).
            self.collate = PackingCollator.for_model(model, tokenizer, no_host_sync=self.micro.active)
            if self.collate.mode == "flash_varlen" and self.micro.active:  # its segment tables change per batch
                self.micro.disable("flash-attention varlen batches change shape from batch to batch")
            if self.micro.active:
                self.collate.pad_to_multiple_of = cfg.max_seq_length
            self._say(packing_stats([train_dataset[i] for i in order], self.units, cfg.batch_size).line())
        else:
            from turbotune.data.dataset import DataCollator
            self.units = train_dataset
            self.collate = DataCollator(tokenizer)
        self.n_micro = math.ceil(len(self.units) / (cfg.batch_size * self.world.size))  # global micro-batches
        check_values(cfg)  # also for configs built in code: max_steps=0 or -1 must not mean "use epochs"
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.n_micro / cfg.grad_accum))
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        self.history: list[dict] = []
        self.step = 0
        self.skipped = 0

    # ----- data order: a pure function of (seed, micro-batch index), so resuming needs only the step -----
    def _micro_batch(self, index: int) -> dict | None:
        """This rank's part of micro-batch `index` (all of it in one process); None: no rows left for it."""
        epoch, pos = divmod(index, self.n_micro)
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(len(self.units), generator=g).tolist()
        rows = [self.units[i] for i in self.world.rows_of(perm, pos, self.cfg.batch_size)]
        if not rows and self.sharded is not None:  # FSDP2: every rank runs every micro-step (collectives)
            from turbotune.training.fsdp import idle_batch
            return idle_batch(self.collate(self.units[:1]))
        if not rows:
            return None
        batch = self.collate(rows)
        if self.micro.active and len(rows) < self.cfg.batch_size:  # the epoch's last, short micro-batch
            from turbotune.training.packing import fill_rows
            batch = fill_rows(batch, self.cfg.batch_size)
        return batch

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.step * self.cfg.grad_accum / self.n_micro,
                "total_steps": self.total_steps, "history": self.history, "skipped_nonfinite": self.skipped,
                "config": self.cfg.to_dict(), "world_size": self.world.size,
                # what a 4-bit base was dequantised to: the export merges into exactly those weights (merge.py)
                "compute_dtype": str(unwrap_peft(self.model).dtype).replace("torch.", "")}

    # ----- output folder -----
    def _prepare_output_dir(self) -> Path | None:
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(self.out)
        run_file = self.out / "run_config.json"
        existing = None
        if run_file.is_file():
            existing = json.loads(run_file.read_text(encoding="utf-8"))
        has_work = bool(ckpt.list_checkpoints(self.out)) or (self.out / ckpt.LAST).exists()
        if existing is not None and not self.cfg.overwrite:
            theirs, ours = self._global_identity(existing), self._global_identity(self.cfg.to_dict(), self.world.size)
            if theirs != ours:
                diff = [k for k in TrainConfig.IDENTITY if theirs.get(k) != ours[k]]
                raise ConfigError(f"{self.out} already holds a different run (differs in: {', '.join(diff)}); "
                                  "choose another --output-dir, or pass --overwrite to replace it")
            if has_work and not self.cfg.resume:
                raise ConfigError(f"{self.out} already holds checkpoints of this run; pass --resume to continue "
                                  "it, or --overwrite to start over")
        if self.cfg.overwrite and not self.cfg.resume:
            for _, p in ckpt.list_checkpoints(self.out):
                shutil.rmtree(p)
            for name in (ckpt.LAST, "training_log.json", "loss.png"):
                p = self.out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        ckpt.write_json_atomically(run_file, self.cfg.to_dict())
        return ckpt.latest_checkpoint(self.out) if self.cfg.resume else None

    def _global_identity(self, config: dict, world_size: int | None = None) -> dict:
        """The settings a run is identified by, batch_size counted over all ranks: a run's world size is in its
        checkpoints (1 before there were several), so a run resumes with another number of ranks as long as
        the global batch is the same."""
        if world_size is None:
            last = ckpt.latest_checkpoint(self.out)
            state = json.loads((last / "trainer_state.json").read_text(encoding="utf-8")) if last is not None else {}
            world_size = int(state.get("world_size", 1))
        identity = identity_of(config)
        if isinstance(identity["batch_size"], int):
            identity["batch_size"] *= world_size
        return identity

    def _resume_from(self, path: Path) -> None:
        state, tensors = ckpt.load_trainer_state(path)
        ckpt.load_adapter_weights(self.model, path, prepare=self.sharded.shard_adapter if self.sharded else None)
        if tensors.get("optimizer"):
            self.optimizer.load_state_dict(tensors["optimizer"])
            if self.sharded is not None:
                self.sharded.shard_optimizer(self.optimizer)
        if tensors.get("scheduler"):
            self.scheduler.load_state_dict(tensors["scheduler"])
        ckpt.set_rng_state(tensors["rng"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.skipped = int(state.get("skipped_nonfinite", 0))
        self._say(f"resuming from {path} at step {self.step} of {self.total_steps}")

    def _say(self, text: str) -> None:
        print(f"[turbotune] {text}", file=self.stream, flush=True)

    def save(self, final: bool = False) -> Path:
        """Written by rank 0 alone; every rank returns once it is on disk. Under FSDP2 every rank first takes part
        in gathering the whole adapter and optimizer state."""
        whole = {}
        if self.sharded is not None:
            whole = dict(zip(("adapter_state", "optimizer_state"), self.sharded.full_states(self.optimizer)))
        return self.world.run_on_main(lambda: self._save(final, whole))

    def _save(self, final: bool, whole: dict) -> Path:
        if final:
            target = self.out / ckpt.LAST
            extra = {"run_config.json": dump(self.cfg)}
            path = ckpt.save_checkpoint(target, self.model, self.optimizer, self.scheduler, self._state(),
                                        tokenizer=self.tokenizer, extra_files=extra, **whole)
        else:
            path = ckpt.save_checkpoint(self.out / f"checkpoint-{self.step}", self.model, self.optimizer,
                                        self.scheduler, self._state(), **whole)
            ckpt.rotate(self.out, self.cfg.save_total_limit)
        return path

    def _write_outputs(self) -> None:
        if not self.world.is_main:
            return
        write_log(self.out, self.history, {"steps": self.step, "skipped_nonfinite": self.skipped})
        plot_losses(self.out, self.history)

    # ----- one optimizer step -----
    def _train_step(self) -> tuple[float, int]:
        ga = self.cfg.grad_accum
        first = self.step * ga
        batches = [b for b in (self._micro_batch(first + i) for i in range(ga)) if b is not None]
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        n_targets = self.world.global_count(n_targets, self.device)  # every rank divides by the step's total
        num_items = torch.tensor(max(n_targets, 1), device=self.device)
        total, tokens = None, 0
        for i, b in enumerate(batches):
            if self.sharded is not None:  # FSDP2 reduce-scatters the gradients after the step's last backward
                self.sharded.gradient_sync(i == len(batches) - 1)
            n_tok = b.pop("num_tokens", None)  # packed batches count their real tokens; padded ones have a mask
            tokens += int(n_tok) if n_tok is not None else int(b["attention_mask"].sum())
            b = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            # use_cache=False matters for packing: with a cache transformers skips its document-mask detection.
            loss = self.micro({**b, "num_items_in_batch": num_items, "use_cache": False})
            total = loss if total is None else total + loss
        # one wait for the device per step, not per micro-batch; with several ranks, their gradient sum
        return self.world.reduce_step(self.params, total, tokens, grads=self.sharded is None)

    def _zero_grad(self) -> None:
        self.micro.zero_grad(self.optimizer)  # in place while graphs accumulate into these tensors

    def _print_prediction(self, choice=None) -> None:
        """The planner's predicted peak before the first step (for the auto plan's `choice` when there is one);
        the measured peak is printed at the end."""
        if self.device.type != "cuda":
            return
        from turbotune.planner.summary import prediction_line
        from turbotune.planner.predict import predict_peak
        try:
            lm = unwrap_peft(self.model)
            mode = choice.mode if choice is not None else self.cfg.gradient_checkpointing
            plan = predict_peak(lm.config, self.cfg.max_seq_length, self.cfg.batch_size,
                                qlora=turbo_state(lm).quantized, lora_r=self.cfg.lora_r, checkpointing=mode, dtype=lm.dtype,
                                double_quant=self.cfg.double_quant,
                                checkpointed_layers=choice.layers if choice is not None else None)
            self._say(prediction_line(plan).removeprefix("[turbotune] "))
        except Exception as e:  # noqa: BLE001 - a prediction must never stop a run
            self._say(f"(no memory prediction: {e})")

    def train(self, resume_from_checkpoint=None) -> TrainResult:
        """Run to `total_steps`. resume_from_checkpoint: True (the newest checkpoint in the output dir, like
        `--resume`) or the path of a checkpoint folder; None follows cfg.resume."""
        self._prepare_run(resume_from_checkpoint)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        interrupted = self._step_loop(bar)
        if bar:
            bar.close()
        return self._finish(interrupted)

    def _prepare_run(self, resume_from_checkpoint) -> None:
        """Output folder, checkpointing plan, memory prediction, CUDA graphs line, then the resume (if any)."""
        if resume_from_checkpoint:
            self.cfg.resume = True
        self.model.train()
        resume_path = self.world.run_on_main(self._prepare_output_dir)
        if isinstance(resume_from_checkpoint, (str, Path)):
            resume_path = Path(resume_from_checkpoint)
            if not (resume_path / "trainer_state.json").is_file():
                raise ConfigError(f"{resume_path} is not a turbotune checkpoint (no trainer_state.json)")
        if turbo_state(self.model).checkpointing == "auto":
            from turbotune.training.auto_checkpointing import plan_checkpointing
            choice = plan_checkpointing(self.model, self.cfg.max_seq_length, self.cfg.batch_size)
            self._say(choice.line())
        else:
            choice = None
        self._print_prediction(choice)
        if self.micro.active:  # the plan may have switched to offloading, which the graphs then hold too
            self.micro.recheck()
        if self.device.type == "cuda":
            state = ("on (each micro-step shape replays after two eager steps; --no-cuda-graphs to turn off)"
                     if self.micro.active else f"off ({self.micro.disabled_reason})")
            self._say("CUDA graphs: " + state)
        if self.cfg.resume:
            if resume_path is None:
                self._say(f"--resume: no checkpoint in {self.out} yet, starting from step 0")
            else:
                self._resume_from(resume_path)

    def _step_loop(self, bar):
        """Optimizer steps until `total_steps` or a signal; logs every `logging_steps`, saves every `save_steps`.
        Returns the signal number that stopped it, or None."""
        table = LogTable(self.stream, write=bar.write if bar else None)
        window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
        with _SignalGuard() as guard:
            while self.step < self.total_steps:
                try:
                    loss, tokens = self._train_step()
                except torch.OutOfMemoryError:
                    self._zero_grad()
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None
                    raise TrainingStopped(oom_message(self.cfg, self.step + 1, self.cfg.max_seq_length,
                                                      turbo_state(self.model).quantized)) from None
                if not math.isfinite(loss):
                    self._skip_nonfinite(loss)
                    continue
                if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self._zero_grad()
                self.step += 1
                window_loss += loss
                window_steps += 1
                window_tokens += tokens
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % self.cfg.logging_steps == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    row = table.row(self.step, window_loss / window_steps, lr,
                                    self.step * self.cfg.grad_accum / self.n_micro,
                                    window_tokens / max(now - window_t0, 1e-9))
                    self.history.append(row)
                    window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
                if self.cfg.save_steps and self.step % self.cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save()
                stop = self.world.agree_on_stop(guard.received)  # every rank stops after the same step
                if stop is not None:
                    return stop
        return None

    def _skip_nonfinite(self, loss: float) -> None:
        """A NaN / inf loss: stop (outputs written, the last good checkpoint named), or with --skip-nonfinite
        count the step as taken without an optimizer update."""
        self._zero_grad()
        if not self.cfg.skip_nonfinite:
            self._write_outputs()
            last = ckpt.latest_checkpoint(self.out)
            raise TrainingStopped(
                f"the loss became {loss} at step {self.step + 1}. Likely causes: a learning rate too "
                f"high (now {self.cfg.lr:g}; try a tenth), fp16 overflow (use bf16 or fp32), or a broken "
                f"sample. The last good checkpoint is {last or 'none (none was saved yet)'}; continue "
                "from it with --resume and a lower --lr, or pass --skip-nonfinite to skip such steps.")
        self.skipped += 1
        self.step += 1
        self.scheduler.step()
        self._say(f"step {self.step}: non-finite loss ({loss}); step skipped "
                  f"({self.skipped} so far)")

    def _finish(self, interrupted) -> TrainResult:
        """Interrupted: save a checkpoint and stop. Otherwise the final save, the log and the summary line."""
        if interrupted is not None:
            path = self.save()
            self._write_outputs()
            name = signal.Signals(interrupted).name
            raise TrainingStopped(
                f"{name}: stopped at step {self.step} of {self.total_steps}; checkpoint saved to {path}. "
                f"Resume with the same command plus --resume.", exit_code=128 + int(interrupted))
        last = self.save(final=True)
        self._write_outputs()
        label, peak = memory_now()
        summary = {"steps": self.step, "skipped_nonfinite": self.skipped, "peak_memory_gib": peak,
                   "memory_kind": label, "last_checkpoint": str(last)}
        if self.world.is_main:
            write_log(self.out, self.history, summary)
        self._say(f"done: {self.step} steps, final loss {self.history[-1]['loss']:.4f}, peak {label} {peak:.2f} GiB; "
                  f"adapter + tokenizer in {last}; loss plot {self.out / 'loss.png'}")
        return TrainResult(self.step, self.history, self.out, last, self.skipped, False, summary)
