"""mmgpt-train: multimodal pretraining and fine-tuning under DeepSpeed ZeRO.

    deepspeed --num_gpus 8 --module mmgpt_engine.train --config configs/train_tiny.yaml \\
        --deepspeed_config configs/ds_zero3.json --output_dir runs/x
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module mmgpt_engine.train      # 2 CPU ranks (gloo)
    python -m mmgpt_engine.train --max_steps 50                                 # one process, no launcher
    mmgpt-train --init_from runs/x/model --freeze vision --config my_data.yaml  # second stage

With no arguments: the tiny preset on the built-in captioned shapes with configs/ds_zero0.json.
A run goes through named phases (`run`): plan (configuration, environment, data and resume checks:
fail fast, nothing built) -> init_distributed (process group and the watch for lost ranks; a
universal conversion if the checkpoint needs one) -> build (model + --init_from, data, engine,
trainer) -> resume (the trainer's load_state_dict) -> train -> finish (export, loss curve,
summary). Outputs in
--output_dir: metrics.jsonl, tensorboard/, loss_curve.png, checkpoints/, model/ (fp32 safetensors
+ config).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch
import yaml
from deepspeed.accelerator import get_accelerator

from .. import ops
from ..data import build_dataset, get_tokenizer, make_collate, tokenizer_fingerprint
from ..model.config import ModelConfig
from . import preflight
from .batches import build_batches
from .checkpoint import (CheckpointError, CheckpointManager, ResumeTarget, complete_checkpoints,
                         convert_to_universal, find_resume, needs_universal_conversion)
from .config import (ConfigError, TrainConfig, apply_overrides, default_config_path, default_deepspeed_config_path,
                     load_yaml)
from .ds_config import load_deepspeed_config, lr_lambda, resolve_deepspeed_config, zero_stage
from . import conversations
from .evaluation import Evaluator, held_out_questions
from .faults import NonFiniteGuard, NonFiniteLossError, PeerWatch, StopSignal, is_communication_failure, on_rank0
from .loop import LoopState, Trainer
from .metrics import MetricsLogger, device_peak_tflops, plot_caption_grid, plot_loss_curve
from .weights import build_model, export_pretrained, freeze, parameter_groups, register_tied_head, train_only

# a flag -> the config key it sets
FLAG_KEYS = {"output_dir": "run.output_dir", "max_steps": "run.max_steps", "save_steps": "run.save_steps",
             "logging_steps": "run.logging_steps", "eval_steps": "run.eval_steps", "seed": "run.seed",
             "backend": "run.backend", "init_from": "run.init_from", "freeze": "run.freeze",
             "precision": "run.precision", "micro_batch_size": "batch.micro_batch_size",
             "grad_accum": "batch.grad_accum"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgpt-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key: --set section.key=value (e.g. --set model.n_layer=2).")
    p.add_argument("--config", help="training yaml (default: configs/train_tiny.yaml)")
    p.add_argument("--output_dir", help="where checkpoints, logs and the exported model go")
    p.add_argument("--max_steps", type=int, help="optimizer steps to train (the schedule's length)")
    p.add_argument("--save_steps", type=int, help="checkpoint every N steps (0: only at the end / on a signal)")
    p.add_argument("--logging_steps", type=int, help="print a log line every N steps (metrics.jsonl has every step)")
    p.add_argument("--eval_steps", type=int, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--resume", default="auto",
                   help="auto (default): continue from the newest complete checkpoint in output_dir if any; "
                        "PATH: a checkpoint folder (or a checkpoints/output folder); none: start fresh")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="with --resume none: delete the checkpoints and logs already in output_dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", choices=list(ops.BACKENDS), help="kernel backend of the model's ops")
    p.add_argument("--init_from", help="weights to start from: a save_pretrained folder or a Hugging Face GPT-2 "
                                       "folder/file (the optimizer state starts fresh)")
    p.add_argument("--freeze", choices=["none", "vision", "text"], help="parameters to keep fixed")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--micro_batch_size", type=int, help="samples per rank per micro step")
    p.add_argument("--grad_accum", type=int, help="micro steps per optimizer step")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the launcher
    deepspeed.add_config_arguments(p)
    return p


def load_config(args) -> TrainConfig:
    if args.config is not None:
        values = load_yaml(args.config)
        source = args.config
    elif default_config_path().is_file():
        values, source = load_yaml(default_config_path()), str(default_config_path())
    else:
        values, source = {}, "built-in defaults"
    apply_overrides(values, args.overrides)
    cfg = TrainConfig.from_dict(values, source=source)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            cfg.set(key, value)
    init_from = cfg.run.init_from
    if cfg.data.tokenizer is None and init_from and any(
            (Path(init_from) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        cfg.data.tokenizer = init_from  # a model exported by a run brings the tokenizer it was trained with
    cfg.validate()
    return cfg


def load_ds_config(args) -> tuple[dict, str]:
    path = args.deepspeed_config
    if path is None and default_deepspeed_config_path().is_file():
        path = str(default_deepspeed_config_path())
    if path is None:
        return {"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}, "built-in ZeRO-0 config"
    return load_deepspeed_config(path), path


def main(argv: Optional[Sequence[str]] = None) -> int:
    stop = StopSignal().install()  # from the start: a signal during set-up still ends in a clean save
    peers = PeerWatch()            # started with the process group
    leaving = "done"               # what this rank tells the others when it leaves
    try:
        return run(argv, stop, peers)
    except (ConfigError, CheckpointError) as e:
        leaving = f"{type(e).__name__}: {e}"
        print(f"mmgpt-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:
        leaving = f"{type(e).__name__}: {e}"
        print(f"mmgpt-train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:
        leaving = f"{type(e).__name__}: {e}"
        if is_communication_failure(e):
            peers.collective_failed(e)  # a lost peer ends this process in there, naming it
        raise
    finally:
        peers.stop(leaving)
        stop.restore()
        release_shm_workspace()


def release_shm_workspace(lost: Sequence[int] = ()) -> None:
    """On CPU ranks DeepSpeed's shared-memory allreduce creates /dev/shm/deepspeed_allreduce_buffer_
    <uid>_<master addr>_<master port>_<rank> (~66 MB per rank) and never unlinks it, so every run
    would leave its buffers in RAM until /dev/shm fills. Each rank removes its own at exit (the other
    ranks' mappings of it stay valid until they exit), and a survivor those of the `lost` ranks,
    which were killed before they could: DeepSpeed makes the buffers only when every rank is on
    this host (LOCAL_SIZE = WORLD_SIZE), so those are this host's too."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        ranks = {os.environ.get("RANK", "0")}
        if lost and os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE"):
            ranks |= {str(r) for r in lost}
        for rank in ranks:
            Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


@dataclass
class RunPlan:
    """Everything decided before a process group, dataset or model exists."""
    args: argparse.Namespace
    cfg: TrainConfig
    model_config: ModelConfig
    ds: dict                              # the resolved DeepSpeed config
    rank: int
    world: int
    local_rank: int
    launched: bool                        # started by a launcher (else: one process, set up here)
    accelerator: object                   # DeepSpeed's accelerator
    output_dir: Path
    target: Optional[ResumeTarget]        # the checkpoint to resume (None: a fresh start)
    universal: bool                       # the target must be converted to a universal checkpoint first

    @property
    def device_type(self) -> str:
        return self.accelerator.device_name()


@dataclass
class BuiltRun:
    """What the build phase made: the engine and the trainer that drives it."""
    engine: object
    trainer: Trainer
    tokenizer: object
    model_config: ModelConfig
    n_params: int
    frozen: int
    device_name: str


def run(argv: Optional[Sequence[str]], stop: StopSignal, peers: PeerWatch) -> int:
    plan = plan_run(argv)
    device = init_distributed(plan, peers)
    resume_source = plan.target
    if plan.universal:
        # another world size or ZeRO stage: DeepSpeed's converter, once, on rank 0 (collective)
        plan.target = convert_to_universal(plan.target, plan.output_dir / "checkpoints")
    built = build(plan, device, stop)
    if plan.target is not None:
        built.trainer.load_state_dict(built.trainer.checkpoints.load(built.engine, plan.target))
    if plan.rank == 0:
        announce(plan, built, resume_source)
    state = train(built.trainer)
    finish(plan, built, state, device, peers)
    return 0


# ------------------------------------------------------------------ 1. plan: fail fast, nothing built
def plan_run(argv: Optional[Sequence[str]]) -> RunPlan:
    """Parse and check the configuration, the environment, the data and the resume target."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args)
    model_config = cfg.model_config()
    ds_raw, ds_source = load_ds_config(args)
    rank, world, local_rank, launched = preflight.launch_env()
    acc = get_accelerator()
    device_type = acc.device_name()
    ds = resolve_deepspeed_config(ds_raw, cfg, world_size=world, accelerator=device_type,
                                  bf16_supported=bool(acc.is_bf16_supported()), hidden_size=model_config.n_embd,
                                  source=ds_source)
    preflight.check_backend(cfg.run.backend, device_type)
    attention_note = preflight.check_attention_backend(model_config, cfg.run.backend, cfg.run.precision, device_type)
    if attention_note and rank == 0:
        print(f"mmgpt-train: {attention_note}", file=sys.stderr, flush=True)
    preflight.check_data(cfg)
    if cfg.optim.lr_per_part and "scheduler" in ds:
        raise ConfigError(f"optim.lr_per_part: the DeepSpeed config's scheduler block ({ds_source}) sets one lr for "
                          f"every parameter group; remove the block (the run's own schedule keeps each part's lr) or "
                          f"optim.lr_per_part")
    if cfg.run.init_from is not None and not Path(cfg.run.init_from).exists():
        raise ConfigError(f"--init_from: no such file or folder {cfg.run.init_from!r}")
    preflight.check_init_from(cfg, model_config)
    output_dir = Path(cfg.run.output_dir)
    preflight.check_output_dir(output_dir, rank)
    target = find_resume(args.resume, output_dir)
    if target is not None:
        preflight.check_resume_tokenizer(cfg, target)
    universal = target is not None and needs_universal_conversion(target, world, zero_stage(ds))
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    if target is None and complete_checkpoints(output_dir / "checkpoints") and not args.overwrite_output_dir:
        raise ConfigError(f"--output_dir {str(output_dir)!r} holds checkpoints of another run and --resume is "
                          f"{args.resume!r}: continue it with --resume auto, or pass --overwrite_output_dir, or "
                          f"choose another --output_dir")
    return RunPlan(args=args, cfg=cfg, model_config=model_config, ds=ds, rank=rank, world=world,
                   local_rank=local_rank, launched=launched, accelerator=acc, output_dir=output_dir, target=target,
                   universal=universal)


# ------------------------------------------------------------------ 2. the process group
def init_distributed(plan: RunPlan, peers: PeerWatch) -> torch.device:
    """Join the process group (or make a world of one) and start watching the other ranks (a lost
    one ends the job, see faults.PeerWatch); returns this rank's device."""
    if not plan.launched:
        preflight.single_process_env()
    if plan.device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one host share its cores; oversubscribed threads slow every rank down
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", plan.world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_size, 1)))
    # DeepSpeed's ZeRO calls torch.distributed functions that torch now flags on every rank
    warnings.filterwarnings("ignore", message=r".* is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    acc = plan.accelerator
    timeout = plan.cfg.run.collective_timeout_s
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), verbose=False,
                               **({"timeout": timedelta(seconds=timeout)} if timeout is not None else {}))
    if plan.device_type != "cpu":
        acc.set_device(plan.local_rank)
    if plan.args.overwrite_output_dir and plan.target is None and plan.rank == 0:
        for name in ("checkpoints", "tensorboard", "model"):
            shutil.rmtree(plan.output_dir / name, ignore_errors=True)
        (plan.output_dir / "metrics.jsonl").unlink(missing_ok=True)
    peers.start(plan.rank, plan.world, plan.cfg.run.peer_timeout_s,
                describe_resume=lambda: resume_hint(plan.output_dir), cleanup=release_shm_workspace)
    dist.barrier()  # every rank's first heartbeat is in the store before rank 0 reads them
    return torch.device(acc.current_device_name())


def resume_hint(output_dir: Path) -> str:
    """Where a job that lost a rank continues from (for the lost-peer message)."""
    try:
        target = find_resume("auto", output_dir)
    except CheckpointError:
        target = None
    if target is None:
        return f"No complete checkpoint is in {output_dir / 'checkpoints'} yet: a new run starts from step 0."
    return (f"The newest complete checkpoint is {target.path} (step {target.meta.get('step')}): continue with --resume "
            f"auto, also on fewer ranks (another world size goes through a universal checkpoint; raise --grad_accum "
            f"to keep the global batch).")


# ------------------------------------------------------------------ 3. build: data, model, engine, trainer
def build(plan: RunPlan, device: torch.device, stop: StopSignal) -> BuiltRun:
    cfg, rank, world, seed = plan.cfg, plan.rank, plan.world, plan.cfg.run.seed
    # the same seed on every rank while the weights are drawn: ZeRO-3 keeps each rank's own shard
    _seed_all(seed)
    # resuming, the checkpoint overwrites these weights, but a run that began from --init_from still
    # needs that model's sizes
    model = build_model(plan.model_config, cfg.run.init_from, cfg.run.backend, written=cfg.model)
    model_config = model.config  # --init_from brings its own sizes; the data must fit them
    frozen = train_only(model, cfg.run.train) if cfg.run.train else freeze(model, cfg.run.freeze)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if zero_stage(plan.ds) == 3:
        register_tied_head(model)
        # every rank runs the vision encoder at every step, images or not (its gathers are collective)
        model.vision_every_step = model.vision is not None
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    train_set, val_set = build_datasets(cfg, model_config, tokenizer, rank, world)
    collate = make_collate(tokenizer)
    questions, start_record = None, {}
    if cfg.data.kind == "llava":
        start_record = _audit_conversations(train_set, cfg, rank)
        if val_set is not None and cfg.data.caption_eval_samples > 0:
            questions = held_out_questions(val_set, rank, world, cfg.data.caption_eval_samples, train_set.template,
                                           tokenizer, model_config.max_seq_len, train_set.image_tokens)
        conversations.template_for_export(tokenizer, train_set.template)
    _seed_all(seed + 1000 * (rank + 1))  # then a stream per rank (dropout)
    scheduler = None if "scheduler" in plan.ds else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    groups = parameter_groups(model, cfg.optim.weight_decay, cfg.optim.lr_per_part)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=plan.ds,
                                           lr_scheduler=scheduler, dist_init_required=False)
    peak, device_name = device_peak_tflops(device)
    trainer = Trainer(
        engine=engine, cfg=cfg, model_config=model_config,
        batches=_batches(cfg, train_set, collate, rank, world),
        evaluator=Evaluator(val_set, collate, tokenizer, model_config, cfg.batch.micro_batch_size, rank, world,
                            cfg.data.val_samples, cfg.data.caption_eval_samples, captions=cfg.data.kind == "shapes",
                            questions=questions),
        checkpoints=CheckpointManager(plan.output_dir, keep=cfg.run.keep_checkpoints,
                                      meta={"tokenizer": tokenizer_fingerprint(tokenizer),
                                            "tokenizer_name": cfg.data.tokenizer or "byte"}),
        metrics=MetricsLogger(plan.output_dir, rank, cfg.run.max_steps, progress=cfg.run.progress),
        device=device, rank=rank, world=world, stop=stop, guard=NonFiniteGuard(cfg.run.max_nonfinite),
        peak_tflops=peak, start_record=start_record)
    return BuiltRun(engine=engine, trainer=trainer, tokenizer=tokenizer, model_config=model_config,
                    n_params=n_params, frozen=frozen, device_name=device_name)


def _batches(cfg: TrainConfig, train_set, collate, rank: int, world: int):
    b = cfg.batch
    group = b.micro_batch_size * b.grad_accum * world if cfg.data.group_by_modality_length else None
    try:
        return build_batches(train_set, collate, b.micro_batch_size, rank, world, cfg.run.seed, cfg.data.num_workers,
                             stall_warning_s=cfg.data.stall_warning_s, modality_group=group)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _audit_conversations(train_set, cfg: TrainConfig, rank: int) -> dict:
    """Rank 0 renders the audited share and prints what the loss will see; a run over
    data.max_unscorable_fraction stops on every rank. Returns the counts for metrics.jsonl."""
    def run_audit():
        report, lines = conversations.audit(train_set, cfg)
        print("\n".join(f"mmgpt-train: {line}" if i == 0 else line for i, line in enumerate(lines)),
              file=sys.stderr, flush=True)
        return report

    report = on_rank0(run_audit, "the data audit", ConfigError)
    counts = [report] if rank == 0 else [None]
    dist.broadcast_object_list(counts, src=0)
    report = counts[0]
    return {"audit_samples": report["samples"], "audit_scored_tokens": report["scored_tokens"],
            "audit_unscorable": sum(report["skipped"].values()), "audit_truncated": report["truncated"]}


def build_datasets(cfg: TrainConfig, model_config: ModelConfig, tokenizer, rank: int, world: int):
    """(train set, held-out set or None), sized for the model: its image size and channels, and
    the text positions its sequence leaves after the image prefix (conversations: their whole
    sequence, the image tokens counted where they stand)."""
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"data.tokenizer: its {tokenizer.vocab_size} ids do not fit model.vocab_size "
                          f"{model_config.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
    if cfg.data.kind == "llava":
        return conversations.conversation_datasets(cfg, model_config, tokenizer)
    d = cfg.data
    common = dict(tokenizer=tokenizer, image_size=model_config.image_size, in_channels=model_config.in_channels,
                  max_text_len=model_config.max_text_len, seed=cfg.run.seed, rank=rank, world_size=world,
                  image_processor=conversations.image_transform(cfg, model_config), **d.options)
    val_path = d.val_path or (d.path if "{split}" in (d.path or "") else None)
    try:
        train_set = build_dataset(d.kind, path=d.path, split="train", **common)
        if d.kind == "shapes":
            val_set = build_dataset("shapes", split="val", **common)
        else:
            val_set = build_dataset(d.kind, path=val_path, split="val", **common) if val_path is not None else None
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ConfigError(f"data: {e}") from e
    return train_set, val_set


# ------------------------------------------------------------------ 5. train
def train(trainer: Trainer) -> LoopState:
    try:
        return trainer.run()
    finally:
        trainer.metrics.close()


# ------------------------------------------------------------------ 6. export and report
def finish(plan: RunPlan, built: BuiltRun, state: LoopState, device: torch.device, peers: PeerWatch) -> None:
    """Export the model (a run that was not stopped), write the loss curve and print the summary."""
    cfg, trainer = plan.cfg, built.trainer
    start = trainer.start_step
    if state.stopped_by is None and start >= cfg.run.max_steps and trainer.evaluator.enabled:
        state.last_eval = trainer.evaluator.run(built.engine, device)  # a finished run resumed: report it again
    exported = None
    if state.stopped_by is None and cfg.run.export:
        exported = export_pretrained(built.engine, built.model_config, plan.output_dir / "model",
                                     tokenizer=built.tokenizer, backend=cfg.run.backend)
    if plan.rank == 0:
        metrics_path = trainer.metrics.path
        curve = plot_loss_curve(metrics_path, plan.output_dir / "loss_curve.png") if metrics_path.is_file() else None
        grid = plot_caption_grid(trainer.evaluator.grid, plan.output_dir / "captions.png")
        _summary(cfg, state, plan.output_dir, exported, curve, time.perf_counter() - trainer.started_at, grid)
    # the watch ends before the last barrier: after it rank 0 (and the store it hosts) may be gone
    # while another rank is still on its way out
    peers.stop("done")
    dist.barrier()


def announce(plan: RunPlan, built: BuiltRun, resume_source: Optional[ResumeTarget]) -> None:
    """Rank 0: the run files and the start-up line (what runs where, and from which weights)."""
    cfg, target, start = plan.cfg, plan.target, built.trainer.state.step
    _write_run_files(plan.output_dir, cfg, plan.ds)
    init_from = cfg.run.init_from
    frozen = built.frozen
    built.trainer.metrics.write(
        f"mmgpt-train: {plan.world} rank(s) on {built.device_name} ({plan.accelerator.communication_backend_name()}), "
        f"ZeRO stage {zero_stage(plan.ds)}, {cfg.run.precision}, {built.n_params / 1e6:.2f}M parameters"
        f"{f' ({frozen / 1e6:.2f}M frozen: {_frozen_what(cfg)})' if frozen else ''}, batch "
        f"{cfg.batch.micro_batch_size} x {cfg.batch.grad_accum} accum x {plan.world} = "
        f"{cfg.batch.global_batch_size}, {cfg.run.max_steps} steps"
        + (f", resuming from {target.path} at step {start}" if target is not None else "")
        + (_converted_note(resume_source) if plan.universal and resume_source is not target else "")
        + (f", weights from {init_from}" if init_from and target is None else ""))


def _frozen_what(cfg: TrainConfig) -> str:
    return f"all but {', '.join(cfg.run.train)}" if cfg.run.train else cfg.run.freeze


def _converted_note(source) -> str:
    return (f" (DeepSpeed universal checkpoint converted from {source.path}, written by "
            f"{source.meta.get('world_size')} rank(s) under ZeRO stage {source.meta.get('zero_stage')})")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_run_files(output_dir: Path, cfg: TrainConfig, ds: dict) -> None:
    (output_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (output_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")


def _summary(cfg, state, output_dir: Path, exported, curve, seconds: float, grid=None) -> None:
    ev = state.last_eval or {}
    lines = [f"mmgpt-train: {'stopped by ' + state.stopped_by if state.stopped_by else 'done'} at step {state.step} "
             f"in {seconds:.0f} s"]
    if ev.get("val_loss") is not None:
        lines.append(f"  final val loss      {ev['val_loss']:.4f}")
    if ev.get("val_loss_other_images") is not None:
        lines.append(f"    with other images {ev['val_loss_other_images']:.4f} (the gap is what the model reads from "
                     f"the pixels)")
    if ev.get("caption_acc") is not None:
        lines.append(f"  caption exact-match {100 * ev['caption_acc']:.1f}%")
        per_attr = [f"{a} {100 * ev[f'{a}_acc']:.1f}%" for a in ("size", "color", "shape", "relation")
                    if ev.get(f"{a}_acc") is not None]
        if per_attr:
            lines.append(f"    per attribute     {', '.join(per_attr)}")
    if ev.get("answer_acc") is not None:
        lines.append(f"  answer exact-match  {100 * ev['answer_acc']:.1f}% on held-out images, "
                     f"{100 * (ev.get('answer_acc_blank_images') or 0):.1f}% with the images blanked (the gap is "
                     f"what the model reads from the pixels)")
    lines.append(f"  metrics             {output_dir / 'metrics.jsonl'} (TensorBoard: {output_dir / 'tensorboard'})")
    if curve is not None:
        lines.append(f"  loss curve          {curve}")
    if grid is not None:
        lines.append(f"  captions            {grid} (held-out images, wrong words in red)")
    lines.append(f"  checkpoints         {output_dir / 'checkpoints'} (continue: --resume auto)")
    if exported is not None:
        lines.append(f"  model               {exported} (caption an image: python -m mmgpt_engine.generate "
                     f"--checkpoint {exported} --image IMAGE.png)")
    print("\n".join(lines), flush=True)
