"""Train a tiny model on procedural 4D scenes and write it to t4dopt/models/weights/.

    python examples/train_tiny.py --model scm-tiny
    python examples/train_tiny.py --model joint-tiny
    python examples/train_tiny.py --model joint-tiny-sculpt4d   # fine-tunes joint-tiny
    python examples/train_tiny.py --model wan-tiny              # diffusers WanTransformer3DModel
    python examples/train_tiny.py --model cogvideox-tiny        # diffusers CogVideoXTransformer3DModel

Flow matching (x_t = (1 - t) x_0 + t noise, target noise - x_0, t uniform), AdamW with a cosine
learning-rate decay, fresh scenes every step drawn from the seed; the weights written are an
exponential moving average (EMA) of the trained ones. The run ends with the loss at t = 0.5 on
held-out scenes, beside that of an untrained twin (same config, fresh init).

The diffusers testbeds (`t4dopt.models.diffusers_testbeds`: configs, and how the conditioning
is passed) learn view 0 of the scenes as a video in pixels, called as diffusers calls them
(timestep 1000 t, the first frame's tokens as ``encoder_hidden_states``).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

import t4dopt
from t4dopt.data.tasks import (EVAL_SEED, POSITION_FEATURES, flow_matching_loss, loss_at, scene_batch, training_seed,
                                video_batch)
from t4dopt.models import SCMConfig, Sculpt4DConfig
from t4dopt.models.diffusers_testbeds import FRAMES, PATCH, SIZE, TESTBEDS, Denoiser, build_transformer
from t4dopt.models.joint_mask import set_joint_mask
from t4dopt.models.pretrained import WEIGHTS, build, load, save_pretrained

TASK = {"views": 4, "frames": 8, "size": 16, "patch": 2}
TOKENS = (TASK["size"] // TASK["patch"]) ** 2
CHANNELS = 3 * TASK["patch"] ** 2
COND_DIM = CHANNELS + POSITION_FEATURES  # first frame's tokens and their positions
SCM_CONFIG = SCMConfig(in_channels=CHANNELS, hidden=64, heads=4, depth=2, views=TASK["views"], frames=TASK["frames"],
                       tokens_per_frame=TOKENS, cond_tokens=TOKENS, cond_dim=COND_DIM)
JOINT_CONFIG = Sculpt4DConfig(in_channels=CHANNELS, hidden=64, heads=4, depth=2, frames=TASK["frames"],
                              tokens_per_frame=TOKENS, image_tokens=TOKENS, cond_dim=COND_DIM)
MASK_BLOCK_SIZE = 16
# Per-model defaults (steps, batch, learning rate, EMA decay): the shipped weights were trained with these.
DEFAULTS = {"scm-tiny": (3200, 4, 2e-3, 0.999), "joint-tiny": (3000, 8, 2e-3, 0.999),
            "joint-tiny-sculpt4d": (600, 8, 5e-4, 0.999), "wan-tiny": (2500, 8, 1e-3, 0.999),
            "cogvideox-tiny": (2000, 8, 1e-3, 0.999)}
VIDEO_TASK = {"frames": FRAMES, "size": SIZE, "patch": PATCH}


def initial_model(name: str, seed: int, init: Path | None) -> tuple[torch.nn.Module, str]:
    """The model to train, as ``model(x, t, cond)``, and its task kind ("scm", "joint" or "video")."""
    torch.manual_seed(seed)
    if name in TESTBEDS:
        return Denoiser(build_transformer(TESTBEDS[name].architecture, TESTBEDS[name].config)), "video"
    if name == "scm-tiny":
        return build("SCMNet", vars(SCM_CONFIG)), "scm"
    if name == "joint-tiny":
        return build("Sculpt4DDiT", vars(JOINT_CONFIG)), "joint"
    model = load(init or WEIGHTS / "joint-tiny.safetensors")
    mask = t4dopt.masks.sculpt4d(TASK["frames"], TOKENS, block_size=MASK_BLOCK_SIZE).token_mask()
    return set_joint_mask(model, mask), "joint"


def batch_of(name: str, kind: str, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean samples and conditioning of `batch` scenes drawn from `seed`."""
    if kind == "video":
        return video_batch(batch, channels_first=TESTBEDS[name].channels_first, seed=seed, **VIDEO_TASK)
    return scene_batch(kind, batch, seed=seed, **TASK)


def untrained_twin(name: str, model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A fresh model of the same architecture and config, initialised from `seed`."""
    torch.manual_seed(seed)
    if name in TESTBEDS:
        return Denoiser(build_transformer(TESTBEDS[name].architecture, TESTBEDS[name].config)).eval()
    return build(type(model).__name__, vars(model.config)).eval()


def metadata(name: str, kind: str) -> dict:
    """What a weights file says of its model beyond the weights: name, task, config for diffusers."""
    if name not in TESTBEDS:
        return {"name": name, "task": {"kind": kind, **TASK}}
    testbed = TESTBEDS[name]
    return {"name": name, "library": "diffusers", "config": testbed.config,
            "task": {"kind": kind, **VIDEO_TASK, "channels_first": testbed.channels_first,
                     "conditioning": "encoder_hidden_states = the clean first frame's patch tokens with their "
                                     "position code, [B, 64, 24] (t4dopt.data.tasks.video_batch)",
                     "timestep": "1000 t; the output is the velocity noise - x_0"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=["scm-tiny", "joint-tiny", "joint-tiny-sculpt4d", *TESTBEDS])
    parser.add_argument("--steps", type=int, default=None, help="default: see DEFAULTS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="default: see DEFAULTS")
    parser.add_argument("--lr", type=float, default=None, help="default: see DEFAULTS")
    parser.add_argument("--init", type=Path, default=None, help="joint-tiny weights to fine-tune (sculpt4d only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a busy machine")
    parser.add_argument("--ema", type=float, default=None, help="EMA decay of the written weights; default: see DEFAULTS")
    parser.add_argument("--save-every", type=int, default=0, help="also write the EMA weights every N steps (<out>.stepN.safetensors)")
    parser.add_argument("--out", type=Path, default=None, help="default: t4dopt/models/weights/<model>.safetensors")
    args = parser.parse_args()
    steps, batch, lr, ema = DEFAULTS[args.model]
    args.steps, args.batch, args.lr = args.steps or steps, args.batch or batch, args.lr or lr
    args.ema = ema if args.ema is None else args.ema
    torch.set_num_threads(args.threads)

    model, kind = initial_model(args.model, args.seed, args.init)
    model.train()
    average = copy.deepcopy(model).eval().requires_grad_(False)
    out = args.out or WEIGHTS / f"{args.model}.safetensors"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        x0, cond = batch_of(args.model, kind, args.batch, training_seed(args.seed, step))
        t = torch.rand(args.batch, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = flow_matching_loss(model, x0, cond, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # EMA, its decay warming up so early steps do not dominate
            decay = min(args.ema, (1 + step) / (10 + step))
            for kept, current in zip(average.parameters(), model.parameters()):
                kept.lerp_(current, 1 - decay)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_pretrained(saved(average), out.with_suffix(f".step{step + 1}.safetensors"),
                            {**metadata(args.model, kind), "training": {"steps": step + 1}})
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    seconds = time.perf_counter() - start

    model = average
    x0, cond = batch_of(args.model, kind, 16, EVAL_SEED)
    twin = untrained_twin(args.model, model, args.seed)
    trained, untrained = loss_at(model, x0, cond, 0.5), loss_at(twin, x0, cond, 0.5)
    print(f"loss at t=0.5 on held-out scenes: trained {trained:.4f}, untrained {untrained:.4f} "
          f"(ratio {trained / untrained:.3f}); {seconds:.0f} s of training")

    info = {**metadata(args.model, kind),
            "training": {"steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "ema": args.ema,
                         "seconds": round(seconds), "init": "joint-tiny" if args.model == "joint-tiny-sculpt4d" else None,
                         "mask": f"sculpt4d(block_size={MASK_BLOCK_SIZE})" if args.model == "joint-tiny-sculpt4d" else None},
            "eval": {"loss_t0.5": round(trained, 4), "untrained_loss_t0.5": round(untrained, 4)}}
    save_pretrained(saved(model), out, info)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def saved(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose weights are written: a diffusers transformer without its `Denoiser` wrapper."""
    return model.transformer if isinstance(model, Denoiser) else model


if __name__ == "__main__":
    main()
