"""Training loop, training record, held-out evaluation and the CLI of toy-llava."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mmflow.data.sample import TASKS
from mmflow.models.synthetic.toy import EVAL_DATA_SEED, TOY_ROOT, ToyConfig, build_model, build_processor_for
from mmflow.models.synthetic.toy_training.data import Packed, collate, training_data, validation_data
from mmflow.models.synthetic.toy_training.probes import (
    GroundingHead,
    PatchHead,
    answer_logits,
    answer_loss,
    vision_batch,
    vision_loss,
)

# ---------------------------------------------------------------- training


def lr_at(step: int, steps: int, peak: float, cfg: ToyConfig) -> float:
    """Linear warm-up, the peak until `decay_from * steps` (the two-object families are learnt late,
    at a high rate), then cosine decay to `min_lr_ratio * peak`."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    hold = max(cfg.warmup_steps, int(cfg.decay_from * steps))
    if step < hold:
        return peak
    progress = (step - hold) / max(1, steps - hold)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def batch_order(n_items: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Deterministic batches: a fresh seeded permutation of the pool per epoch."""
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n_items, generator=gen).tolist()
    return [flat[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@torch.no_grad()
def first_token_accuracy(model, data: Packed, pad_id: int, eos_id: int) -> dict[str, float]:
    """Teacher-forced accuracy of the answer's first token per family (a cheap progress signal)."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(data), 64):
        index = list(range(start, min(start + 64, len(data))))
        batch = collate(data, index, pad_id, eos_id)
        predicted = answer_logits(model, batch).argmax(-1)
        firsts = torch.nonzero(torch.diff(batch["rows"], prepend=torch.tensor([-1]))).flatten()
        for i, pos in zip(index, firsts.tolist(), strict=True):  # one segment per validation image
            hits.setdefault(data.tasks[i], []).append(bool(predicted[pos] == batch["targets"][pos]))
    model.train()
    return {task: sum(h) / len(h) for task, h in hits.items()}


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: ToyConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and embeddings."""
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


@dataclass
class TrainData:
    """Everything a training process needs besides the model."""

    pool: Packed
    val: Packed | None
    pad_id: int
    eos_id: int


def _average(params: list[torch.nn.Parameter], extra: torch.Tensor, world: int) -> torch.Tensor:
    """All-reduce the gradients (and `extra`) of the data-parallel processes and average them."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [extra.flatten()])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()
    return flat[offset:]


@dataclass
class Stage:
    """One optimisation stage: its parameters, loss, batches and schedule."""

    name: str
    named_params: list[tuple[str, torch.nn.Parameter]]
    loss: Any  # batch -> (total loss, logged float)
    make_batch: Any  # index list -> batch
    steps: int
    batch_size: int
    peak_lr: float


def run_stage(rank: int, world: int, stage: Stage, cfg: ToyConfig, n_items: int, on_step=None) -> list[float]:
    """Optimise one stage with AdamW (gradients averaged over processes); returns the logged losses."""
    from tqdm.auto import tqdm

    optimizer = make_optimizer(stage.named_params, cfg)
    params = [p for _, p in stage.named_params]
    losses: list[float] = []
    batches = batch_order(n_items, stage.steps, stage.batch_size, cfg.seed + len(stage.name))
    bar = tqdm(batches, desc=f"toy-llava {stage.name}", unit="step", disable=rank != 0)
    for step, index in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, stage.steps, stage.peak_lr, cfg)
        loss, logged = stage.loss(stage.make_batch(index[rank::world]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            logged = float(_average(params, torch.tensor([logged]), world)[0])
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(logged)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if on_step is not None:
            on_step(step + 1, bar)
    bar.close()
    return losses


def train_loop(rank: int, world: int, cfg: ToyConfig, out: Path, data: TrainData, sync: str | None) -> None:
    """One data-parallel process (rank 0 of 1 when not distributed); rank 0 validates and saves."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{sync}", rank=rank, world_size=world)
    model = build_model(cfg, AutoTokenizer.from_pretrained(out))
    heads = {"patch": PatchHead(model), "ground": GroundingHead(model, 1), "gather": GroundingHead(model, 2)}
    model.train()
    torch.manual_seed(cfg.seed)
    for h in heads.values():  # seeded like the model, independent of the process
        h.linear.reset_parameters()
    head = heads["patch"]
    head_params = [(f"head.{n}", p) for n, p in head.named_parameters()]
    ground_params = [
        (f"{name}.{n}", p) for name in ("ground", "gather") for n, p in heads[name].named_parameters()
    ]
    vision = [(n, p) for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n]
    pool = data.pool
    stage1 = Stage(
        "vision",
        vision + head_params,
        lambda b: vision_loss(model, head, b),
        lambda index: vision_batch(pool, index),
        cfg.vision_steps,
        cfg.vision_batch_size,
        cfg.vision_lr,
    )
    vision_losses = run_stage(rank, world, stage1, cfg, len(pool)) if cfg.vision_steps else []
    history: list[dict] = []

    def validate(step: int, bar) -> None:
        if rank == 0 and data.val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            acc = first_token_accuracy(model, data.val, data.pad_id, data.eos_id)
            history.append({"step": step, "val_first_token_acc": acc})
            bar.write(f"step {step}: " + " ".join(f"{t}={a:.2f}" for t, a in acc.items()))

    stage2 = Stage(
        "answers",
        list(model.named_parameters()) + head_params + (ground_params if cfg.ground_weight else []),
        lambda b: answer_loss(model, heads, b, cfg),
        lambda index: collate(pool, index, data.pad_id, data.eos_id),
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
    )
    losses = run_stage(rank, world, stage2, cfg, len(pool), validate)
    if rank == 0:
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        tail = losses[-20:]
        result = {"final_loss": sum(tail) / len(tail), "losses": losses, "vision_losses": vision_losses}
        (out / "_loop.json").write_text(json.dumps({**result, "history": history}))
    if world > 1:
        dist.destroy_process_group()


def train(cfg: ToyConfig, out: Path, command: str) -> dict[str, Any]:
    """Train toy-llava per `cfg` (data-parallel over `cfg.workers` processes), save it to `out` with
    `save_pretrained`, and write and return the training record (training.json)."""
    import tempfile

    started = time.time()
    torch.set_num_threads(cfg.threads)
    processor = build_processor_for(cfg)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    tok = processor.tokenizer
    val = validation_data(cfg, processor, out) if cfg.val_per_task else None
    data = TrainData(training_data(cfg, processor, out), val, tok.pad_token_id, tok.eos_token_id)
    data_seconds = time.time() - started
    if cfg.workers == 1:
        train_loop(0, 1, cfg, out, data, None)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory(prefix="mmflow-toy-") as sync:
            args = (cfg.workers, cfg, out, data, f"{sync}/store")
            workers = mp.spawn(train_loop, args=args, nprocs=cfg.workers, join=False)
            try:
                while not workers.join():
                    pass
            finally:  # on SIGTERM or a failed worker: no orphaned training process keeps running
                for process in workers.processes:
                    if process.is_alive():
                        process.terminate()
    loop = json.loads((out / "_loop.json").read_text())
    (out / "_loop.json").unlink()
    segments = [s for segs in data.pool.segments for s in segs]
    record = {
        "name": "toy-llava",
        "command": command,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "config": asdict(cfg),
        "image_geometry": f"{cfg.image_size} px view, {cfg.patch_size} px patches, "
        f"{(cfg.image_size // cfg.patch_size) ** 2} image tokens, pad preprocessing",
        "train_data": {
            "scene_seed": f"toy:{cfg.train_data_seed}:<index>",
            "images": len(data.pool),
            "segments": len(segments),
            "descriptions": cfg.descriptions * len(data.pool),
        },
        "data_seconds": round(data_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "final_loss": loop["final_loss"],
        "loss_every_50_steps": loop["losses"][::50],
        "vision_loss_every_50_steps": loop["vision_losses"][::50],
        "history": loop["history"],
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------- loading and evaluation


def model_config(path: Path | str | None = None) -> dict[str, Any]:
    """conf/model/toy-llava.yaml as a dict, optionally pointing at another weights folder."""
    from omegaconf import OmegaConf

    from mmflow.config.dirs import CONF_DIR

    conf = CONF_DIR / "model" / "toy-llava.yaml"
    config = OmegaConf.to_container(OmegaConf.load(conf), resolve=True)
    if path is not None:
        config["checkpoint"] = str(path)
    return config


def load_toy(path: Path | str | None = None):
    """The toy model as a `LoadedModel`, through the same loader as every analysis."""
    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import load_model

    return load_model(ModelSpec.from_mapping(model_config(path)))


def evaluate(loaded, n: int, seed: int = EVAL_DATA_SEED, cache_dir: Path | None = None) -> dict[str, float]:
    """Held-out accuracy per family: greedy answer + normalisation exactly as `mmflow.execution.runtime`."""
    from mmflow.data import Sample, load_shapes
    from mmflow.execution.runtime import generate_answer, normalise_answer
    from mmflow.inputs.encode import encode

    accuracy = {}
    for task in TASKS:
        samples = [s for s in load_shapes(task, n, seed=seed, cache_dir=cache_dir) if isinstance(s, Sample)]
        hits = [
            normalise_answer(generate_answer(loaded, encode(loaded, s), 8)) == normalise_answer(s.answer)
            for s in samples
        ]
        accuracy[task] = sum(hits) / max(1, len(hits))
    return accuracy


def _finish_record(out: Path, loaded, n: int) -> dict[str, float]:
    record = json.loads((out / "training.json").read_text())
    accuracy = evaluate(loaded, n) if n > 0 else {}
    record["heldout"] = {"data_seed": EVAL_DATA_SEED, "per_task": n, "accuracy": accuracy}
    record["size_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return accuracy


# ---------------------------------------------------------------- CLI


TRAIN_OPTIONS = {  # CLI flag -> ToyConfig field
    "--steps": "steps",
    "--seed": "seed",
    "--images": "images",
    "--vision-steps": "vision_steps",
    "--batch-size": "batch_size",
    "--lr": "lr",
    "--workers": "workers",
    "--threads": "threads",
    "--val-n": "val_per_task",
    "--val-every": "val_every",
    "--eval-n": "eval_per_task",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmflow.models.synthetic.toy_training", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train toy-llava and save it with save_pretrained")
    defaults = ToyConfig()
    for flag, name in TRAIN_OPTIONS.items():
        value = getattr(defaults, name)
        tr.add_argument(flag, dest=name, type=type(value), default=value, help=f"default {value}")
    tr.add_argument("--out", type=Path, default=TOY_ROOT / "toy-llava")
    ev = sub.add_parser("eval", help="held-out accuracy per family of a trained toy model")
    ev.add_argument("--path", type=Path, default=None, help="weights folder (default: the committed one)")
    ev.add_argument("--n", type=int, default=ToyConfig.eval_per_task)
    ev.add_argument("--seed", type=int, default=EVAL_DATA_SEED, help="data seed of the held-out items")
    return parser


def train_into(cfg: ToyConfig, out: Path, command: str) -> dict[str, Any]:
    """Train and evaluate in a sibling temporary folder, then swap it into `out`: a crash never
    leaves a half-written weights folder behind."""
    import shutil

    from mmflow.storage.files import apply_umask, make_temp_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    work = make_temp_dir(out.parent, f".{out.name}.")
    try:
        record = train(cfg, work, command)
        record["heldout_accuracy"] = _finish_record(work, load_toy(work), cfg.eval_per_task)
        apply_umask(work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.cmd == "train":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so train_into still removes its work dir
        cfg = ToyConfig(**{name: getattr(args, name) for name in TRAIN_OPTIONS.values()})
        command = "python -m mmflow.models.synthetic.toy_training " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        record = train_into(cfg, args.out, command)
        accuracy = record["heldout_accuracy"]
        print(
            f"trained in {record['wall_seconds']:.0f} s, final loss {record['final_loss']:.4f} -> {args.out}"
        )
    else:
        accuracy = evaluate(load_toy(args.path), args.n, seed=args.seed)
    for task, acc in accuracy.items():
        print(f"{task:12s} {acc:6.1%}")


if __name__ == "__main__":
    main()
