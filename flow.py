"""
Flow matching on MNIST, from scratch, in one file.

A UNet u_theta(x_t, t, c) learns the velocity of straight paths from Gaussian noise x0 to
digits x1: x_t = (1 - t) x0 + t x1 moves at u = x1 - x0 (eq. B.3, B.4), so training is plain
regression (eq. B.5). Sampling integrates dx/dt = u_theta from t = 0 (noise) to t = 1 (a digit)
with Euler steps; with classes, classifier-free guidance mixes the conditional and
unconditional velocities. Architecture, algorithms and defaults follow the course assignment;
--method ddpm trains DDPM, the assignment's optional extension, on the same UNet to compare.

    python flow.py --cond class --epochs 10        # class-conditioned, 4 of each digit -> runs/flow_class
    python flow.py --cond time --epochs 10         # time-only, 40 unconditional digits -> runs/flow_time
    python flow.py --sample-only --ckpt samples/flow_class/model.pt --guidance 0,1,5   # a row per gamma
    python flow.py --evaluate 1000 --ckpt samples/flow_class/model.pt --solver midpoint --steps 50
    python flow.py --method ddpm --cond class      # DDPM: 20 epochs, ancestral sampler (or --solver ddim)

Outputs, in --out (default runs/<method>_<cond>), after every epoch: loss.csv, loss.png and ckpt.pt
(--resume it after a crash); samples_epochNN.png after the --sample-epochs and the last; model.pt at
the end. 10 class epochs take 103 min on a 2-core Xeon in fp32, 40 with --amp; --benchmark measures yours.
"""
import argparse
import copy
import functools
import itertools
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

SCRIPT = "flow.py"  # written into every checkpoint; read_checkpoint accepts only its own
# flags newer than some shipped checkpoints, at the values those were trained with
LATER_FLAGS = {"method": "flow", "sinusoidal_t": False, "time_every_block": False, "logit_normal_t": False}

# --- building blocks (the assignment's standard UNet operations) -------------


def bn_gelu(layer):
    """Conv, DownConv, UpConv and Unflatten are one layer followed by BatchNorm and GELU."""
    return nn.Sequential(layer, nn.BatchNorm2d(layer.out_channels), nn.GELU())


class ConvBlock(nn.Sequential):  # i x H x W -> o x H x W
    def __init__(self, i, o):
        super().__init__(bn_gelu(nn.Conv2d(i, o, 3, 1, 1)), bn_gelu(nn.Conv2d(o, o, 3, 1, 1)))


class DownBlock(nn.Sequential):  # i x H x W -> o x H/2 x W/2
    def __init__(self, i, o):
        super().__init__(bn_gelu(nn.Conv2d(i, o, 3, 2, 1)), ConvBlock(o, o))


class UpBlock(nn.Sequential):  # i x H x W -> o x 2H x 2W
    def __init__(self, i, o):
        super().__init__(bn_gelu(nn.ConvTranspose2d(i, o, 4, 2, 1)), ConvBlock(o, o))


class FCBlock(nn.Sequential):  # embeds the conditioning signal t or c
    def __init__(self, i, o):
        super().__init__(nn.Linear(i, o), nn.GELU(), nn.Linear(o, o))


# --- the conditioned UNet ----------------------------------------------------


def time_features(t, n=16):
    """sin and cos of t at n frequencies from 1 to 1000 radians per unit of t: B x 1 -> B x 2n."""
    freqs = torch.logspace(0, 3, n, device=t.device)
    return torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], 1)


class UNet(nn.Module):
    """u_theta(x_t, t, c). num_classes=0 conditions on time only; num_classes=10 adds the
    digit class as a one-hot c, where c = 0 means "no class" (for classifier-free guidance).
    method says what the output is: the velocity ("flow") or the noise in x_t ("ddpm").
    The assignment's UNet sees t raw, in two places; two opt-in changes feed it more: sinusoidal_t
    gives the FCBlocks time_features(t) instead of t, and time_every_block scales and shifts the
    channels of every encoder and decoder block by amounts made from t."""

    def __init__(self, hidden=64, num_classes=0, method="flow", sinusoidal_t=False, time_every_block=False):
        super().__init__()
        D, t_dim = hidden, 32 if sinusoidal_t else 1  # time_features: 16 sines and 16 cosines
        self.num_classes, self.method, self.sinusoidal_t = num_classes, method, sinusoidal_t
        self.conv_in = ConvBlock(1, D)
        self.down1 = DownBlock(D, D)
        self.down2 = DownBlock(D, 2 * D)
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())  # 2D x 7 x 7 -> 2D x 1 x 1
        self.unflatten = bn_gelu(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7, 0))  # back to 7 x 7
        self.up1 = UpBlock(4 * D, D)
        self.up2 = UpBlock(2 * D, D)
        self.conv_out = nn.Sequential(ConvBlock(2 * D, D), nn.Conv2d(D, 1, 3, 1, 1))
        self.fc1_t, self.fc2_t = FCBlock(t_dim, 2 * D), FCBlock(t_dim, D)
        if num_classes:
            self.fc1_c, self.fc2_c = FCBlock(num_classes, 2 * D), FCBlock(num_classes, D)
        self.film = None  # time_every_block: per-channel scale and shift for conv_in, down1, down2, up1, up2
        if time_every_block:  # made zero at first: training starts from the assignment's network
            self.film = nn.ModuleList(nn.Linear(t_dim, 2 * n) for n in (D, D, 2 * D, D, D))
            for layer in self.film:
                nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def time_film(self, i, h, t):
        """h * (1 + scale) + shift with the scale and shift of block i made from t; h itself by default."""
        if self.film is None:
            return h
        scale, shift = self.film[i](t)[..., None, None].chunk(2, 1)
        return h * (1 + scale) + shift

    def forward(self, x_t, t, c=None):
        # x_t: B x 1 x 28 x 28, t: B x 1 in [0, 1], c: B x num_classes one-hot (or zeros)
        t = time_features(t) if self.sinusoidal_t else t
        e0 = self.time_film(0, self.conv_in(x_t), t)  # D x 28 x 28
        e1 = self.time_film(1, self.down1(e0), t)  # D x 14 x 14
        e2 = self.time_film(2, self.down2(e1), t)  # 2D x 7 x 7
        mid = self.unflatten(self.flatten(e2))  # 2D x 7 x 7
        t1, t2 = self.fc1_t(t)[..., None, None], self.fc2_t(t)[..., None, None]
        if self.num_classes:
            c1, c2 = self.fc1_c(c)[..., None, None], self.fc2_c(c)[..., None, None]
            mid = c1 * mid + t1
        else:
            mid = mid * t1
        h1 = self.up1(torch.cat([e2, mid], 1))  # D x 14 x 14
        h1 = self.time_film(3, c2 * h1 + t2 if self.num_classes else h1 * t2, t)
        h2 = self.time_film(4, self.up2(torch.cat([e1, h1], 1)), t)  # D x 28 x 28
        return self.conv_out(torch.cat([e0, h2], 1))  # 1 x 28 x 28


def build_unet(settings):
    """The UNet that a run's flags describe: vars(args), or the args saved in a checkpoint."""
    return UNet(settings["hidden"], 10 if settings["cond"] == "class" else 0, settings["method"],
                settings["sinusoidal_t"], settings["time_every_block"])


# --- flow matching: the loss (Algorithms B.1, B.3) and the solver steps (Algorithms B.2, B.4) ---


def class_input(model, labels, p_uncond):
    """Training's one-hot classes, each dropped to c = 0 with probability p_uncond (Alg. B.3); or None."""
    if labels is None:
        return None
    keep = torch.rand(len(labels), 1, device=labels.device) >= p_uncond
    return F.one_hot(labels, model.num_classes).float() * keep


def flow_matching_loss(model, x1, labels=None, p_uncond=0.1, logit_normal_t=False):
    """Mean squared error between u_theta(x_t, t, c) and the path's velocity x1 - x0 (eq. B.5).
    t is uniform, or with logit_normal_t sigmoid(N(0, 1)): more often near 1/2 than near 0 or 1."""
    x0 = torch.randn_like(x1)
    if logit_normal_t:
        t = torch.randn(x1.shape[0], 1, device=x1.device).sigmoid()
    else:
        t = torch.rand(x1.shape[0], 1, device=x1.device)
    x_t = (1 - t[:, :, None, None]) * x0 + t[:, :, None, None] * x1  # eq. B.3
    return F.mse_loss(model(x_t, t, class_input(model, labels, p_uncond)), x1 - x0)


def flow_step(predict, x, i, steps, solver, generator=None):
    """One step of dx/dt = u_theta(x, t) from t = i / steps to (i + 1) / steps."""
    dt = 1.0 / steps
    t = i * dt
    if solver == "euler":  # Algorithms B.2, B.4
        return x + dt * predict(x, t)
    return x + dt * predict(x + dt / 2 * predict(x, t), t + dt / 2)  # midpoint: the slope at half a step


# --- DDPM on the same UNet: the assignment's optional extension, as its DDPM version had it ---
# DDPM runs the other way: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps holds noise at t = T and the digit x0 at
# t = 0, where flow matching has x_t = (1 - t) x0 + t x1 with noise x0 at t = 0 and the digit x1 at t = 1.
# Both mix noise and data affinely; DDPM's mix is not straight, and its UNet predicts eps, not a velocity.

T = 300  # DDPM's noise levels t = 1..T; the UNet sees t / T


@functools.cache  # made once per device, not at every training or sampling step
@torch.inference_mode(False)  # a plain tensor even if first made while sampling, so training can use it
def alpha_bar(device="cpu"):
    """a_t = prod_{s <= t} (1 - beta_s) for t = 0..T, betas evenly spaced from 1e-4 to 0.02; a_0 = 1."""
    betas = torch.linspace(1e-4, 0.02, T, device=device)
    return torch.cat([torch.ones(1, device=device), torch.cumprod(1 - betas, 0)])


def ddpm_loss(model, x0, labels=None, p_uncond=0.1):
    """Mean squared error between eps_theta(x_t, t / T, c) and the noise eps that made x_t."""
    eps = torch.randn_like(x0)
    t = torch.randint(1, T + 1, (x0.shape[0], 1), device=x0.device)
    a = alpha_bar(x0.device)[t][:, :, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return F.mse_loss(model(x_t, t / T, class_input(model, labels, p_uncond)), eps)


def ddpm_step(predict, x, i, steps, solver, generator):
    """One step from t down to s, through T, T - T/steps, ..., 0: ddpm draws x_s from the posterior
    given x0_hat (the ancestral sampler, noise sqrt(beta) z); ddim puts x0_hat and eps back together at s."""
    if steps > T:
        raise ValueError(f"a DDPM model has {T} noise levels: use --steps {T} or fewer")
    t, s = round(T * (steps - i) / steps), round(T * (steps - i - 1) / steps)
    a = alpha_bar(x.device)
    eps = predict(x, t / T)
    x0_hat = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
    if solver == "ddim":
        return a[s].sqrt() * x0_hat + (1 - a[s]).sqrt() * eps
    beta = 1 - a[t] / a[s]  # beta_t itself when s = t - 1, as with the default 300 steps
    z = torch.randn(x.shape, device=x.device, generator=generator) if s > 0 else 0
    return (a[s].sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - a[s]) * x) / (1 - a[t]) + beta.sqrt() * z


# --- sampling: either method, with classifier-free guidance ---

SOLVERS = {"flow": ["euler", "midpoint"], "ddpm": ["ddpm", "ddim"]}  # the first is the default


@torch.inference_mode()
def sample(model, n, labels=None, steps=50, guidance=5.0, seed=0, solver=None, path=None, guide=None):
    """n digits from noise in `steps` steps of `solver`: euler (1 network call a step) or midpoint
    (2) for a flow model, ddpm or ddim (1) for a DDPM model. labels (a LongTensor of digits) turns on
    classifier-free guidance of weight `guidance`; `guide`, a weaker model of the same kind, autoguidance
    (a second network call per prediction). `path`, if a list, receives x at every step, on the CPU."""
    known = SOLVERS[model.method]
    solver = solver or known[0]
    if solver not in known:
        raise ValueError(f"a {model.method} model samples with {' or '.join(known)}, not {solver}")
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics
    device = next(model.parameters()).device
    # a generator of its own, so sampling never shifts the training run's random stream
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, device=device, generator=generator)
    c = None if labels is None else F.one_hot(labels.to(device), model.num_classes).float()

    def predict(x, t):  # the velocity or the noise, guided away from a worse one: u_bad + gamma (u - u_bad)
        t = torch.full((x.shape[0], 1), t, device=device)
        if guide is not None:  # autoguidance: the worse one is the weaker model's, for the same class
            u, u_bad = model(x, t, c).float(), guide(x, t, c).float()  # fp32 under --amp
        elif labels is not None:  # classifier-free, Alg. B.4: the unconditional one, c = 0, in the same batch
            u, u_bad = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, 0 * c])).float().chunk(2)
        else:
            return model(x, t).float()
        return u_bad + guidance * (u - u_bad)

    for i in range(steps):
        if path is not None:
            path.append(x.cpu())
        x = (ddpm_step if model.method == "ddpm" else flow_step)(predict, x, i, steps, solver, generator)
    if path is not None:
        path.append(x.cpu())
    model.train(was_training)
    return x


# --- data: a whole split as one uint8 tensor on the device -------------------


def load_mnist(root, device, limit=None, train=True):
    """Images (N x 28 x 28 uint8) and labels (N) of an MNIST split, on `device`."""
    try:
        data = torchvision.datasets.MNIST(root, train=train, download=True)
    except (RuntimeError, OSError) as e:
        split = "train" if train else "t10k"
        raise ValueError(f"MNIST is not in {os.path.join(root, 'MNIST', 'raw')} and could not be downloaded "
                         f"({str(e).splitlines()[0]}); put {split}-images-idx3-ubyte and "
                         f"{split}-labels-idx1-ubyte there, or run once with internet access") from e
    return data.data[:limit].to(device), data.targets[:limit].to(device)


# --- training ----------------------------------------------------------------


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model for the weights, d = min(decay, (1 + step) / (10 + step)): early
    steps forget faster, so the random initial weights do not linger. BatchNorm statistics: below."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def measure_batchnorm(ema, loss_fn, x_all, y_all, args, batches=20, batch_size=256):
    """The EMA's BatchNorm statistics, measured afresh on `batches` training inputs: the raw model's
    fit the raw weights, not their average (copied, they cost the EMA's samples FD 34 against 16)."""
    norms = [m for m in ema.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    ema.train()  # BatchNorm normalises by, and records, each batch's own statistics
    with torch.random.fork_rng():  # training draws the same random numbers as without an EMA
        for _ in range(batches):
            idx = torch.randint(len(x_all), (batch_size,), device=x_all.device)
            x = x_all[idx].unsqueeze(1).float() / 255
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
                loss_fn(ema, x, y_all[idx] if ema.num_classes else None, args.p_uncond)
    for m in norms:
        m.momentum = 0.1
    ema.eval()


def train_epoch(model, optimizer, x_all, y_all, epoch, args, ema=None):
    """One pass over the images in a fresh random order, `ema` (if any) following the weights and
    measuring its BatchNorm statistics at the end. Returns the per-step losses; stops at the first
    log step that finds one non-finite."""
    device, loss_fn = x_all.device, ddpm_loss
    if args.method == "flow":
        loss_fn = functools.partial(flow_matching_loss, logit_normal_t=args.logit_normal_t)
    model.train()
    steps = len(x_all) // args.batch_size  # the last partial batch is dropped
    perm = torch.randperm(len(x_all), device=device)
    losses = torch.zeros(steps, device=device)  # read back at log steps only: no sync per step
    t_epoch = t_log = time.time()
    for step in range(steps):
        idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
        x = x_all[idx].unsqueeze(1).float() / 255  # B x 1 x 28 x 28 in [0, 1]
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            loss = loss_fn(model, x, y_all[idx] if model.num_classes else None, args.p_uncond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, args.ema, (epoch - 1) * steps + step)
        losses[step] = loss.detach()
        if (step + 1) % args.log_every and step + 1 < steps:
            continue
        seen = losses[:step + 1].cpu()
        if not seen.isfinite().all():
            first = int((~seen.isfinite()).nonzero()[0])
            kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no checkpoint exists yet"
            at = (epoch - 1) * steps + first + 1
            raise ValueError(f"the loss became {seen[first].item()} at step {at}; {kept}; try a lower --lr")
        now = time.time()
        eta = (now - t_epoch) / (step + 1) * ((args.epochs - epoch + 1) * steps - step - 1)
        images = ((step + 1) % args.log_every or args.log_every) * args.batch_size
        print(f"epoch {epoch:3d}/{args.epochs} | step {step + 1:5d}/{steps} | loss {seen[-1].item():.4f} | "
              f"lr {optimizer.param_groups[0]['lr']:.2e} | {images / (now - t_log):6.0f} img/s | "
              f"eta {eta / 60:5.1f} min", flush=True)
        t_log = now
    if ema is not None:
        measure_batchnorm(ema, loss_fn, x_all, y_all, args)
    return seen.tolist()


def resume(args, model, optimizer, scheduler, ema):
    """Load args.resume into the model, optimizer, scheduler, EMA and the random streams.
    Returns the losses and learning rates so far and the epoch to continue with."""
    ckpt = read_checkpoint(args.resume, next(model.parameters()).device)
    saved = {**LATER_FLAGS, **ckpt["args"]}
    for key in ("cond", "hidden", "batch_size", "epochs", "limit", "ema", *LATER_FLAGS):
        old, new, flag = saved.get(key), getattr(args, key), "--" + key.replace("_", "-")
        if old != new:
            raise ValueError(f"{args.resume} was trained with {flag} {old}, not {new}: "
                             f"pass {flag} {old} to resume it")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ema:
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng_cpu"].cpu())
    if ckpt["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())
    print(f"resumed {args.resume} after epoch {ckpt['epoch']}")
    return ckpt["losses"], ckpt["lrs"], ckpt["epoch"] + 1


def benchmark(model, optimizer, x_all, y_all, args, steps=30):
    """Training images/s over `steps` steps and the seconds one sample grid takes, through the
    same functions a real run uses."""
    args.log_every, args.epochs, n = 10 ** 9, 1, min(len(x_all), steps * args.batch_size)

    def seconds(work):  # the second of two runs: the first pays for warm-up and kernel autotuning
        for _ in range(2):
            t0 = time.time()
            work()
            if x_all.is_cuda:
                torch.cuda.synchronize()
        return time.time() - t0

    train_speed = n // args.batch_size * args.batch_size / seconds(
        lambda: train_epoch(model, optimizer, x_all[:n], y_all[:n], 1, args))
    grid_seconds = seconds(lambda: sample_grid(model, args))
    name = torch.cuda.get_device_name() if x_all.is_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"benchmark on {name}: training {train_speed:.0f} images/s (batch {args.batch_size}); "
          f"{grid_seconds:.2f} s per 40-digit grid ({args.solver[0]}, {args.steps[0]} steps)")


def train(args, device):
    # channels-last memory suits the convolution kernels of CPUs and GPUs alike
    model = build_unet(vars(args)).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.1 ** (1 / args.epochs))  # once an epoch
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None  # sampled from instead of model
    losses, lrs, start_epoch = [], [], 1
    if args.resume:
        losses, lrs, start_epoch = resume(args, model, optimizer, scheduler, ema)
    if args.compile:
        model.compile()  # fuses BatchNorm, GELU and the rest; the first steps are slow while it compiles
    x_all, y_all = load_mnist(args.data, device, args.limit)
    if len(x_all) < args.batch_size:
        raise ValueError(f"--limit {len(x_all)} is less than --batch-size {args.batch_size}: raise --limit")
    if args.benchmark:
        return benchmark(model, optimizer, x_all, y_all, args)
    steps = len(x_all) // args.batch_size
    print(f"{args.cond}-conditioned UNet, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(x_all):,} images, {steps} steps per epoch, device {device}")
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        lrs.append(optimizer.param_groups[0]["lr"])
        losses += train_epoch(model, optimizer, x_all, y_all, epoch, args, ema)
        scheduler.step()
        save_progress(epoch, args, model, optimizer, scheduler, losses, lrs, ema)
        msg = f"epoch {epoch} done in {time.time() - t0:.1f}s, mean loss {sum(losses[-steps:]) / steps:.4f}"
        if epoch in args.sample_epochs or epoch == args.epochs:
            t_sample, frames = time.time(), [] if args.gif and epoch == args.epochs else None
            name = f"samples_epoch{epoch:02d}.png"
            sample_grid(ema or model, args, frames).save(os.path.join(args.out, name))
            if frames:
                save_gif(os.path.join(args.out, "sampling.gif"), frames)
            msg += f"; wrote {name} in {time.time() - t_sample:.1f}s"
        print(msg, flush=True)


# --- outputs: sample grids, the loss curve, checkpoints ----------------------


def grid_image(x, nrow=10, scale=2):
    """A PIL image of the digits in x (N x 1 x 28 x 28), nrow per row, enlarged `scale` times."""
    grid = torchvision.utils.make_grid(x.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=0.5)
    img = Image.fromarray(grid[0].mul(255).round().byte().numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def sample_grid(model, args, path=None, guide=None):
    """The assignment's figure: 40 digits; with classes, column k holds 4 samples of digit k."""
    labels = torch.arange(10).repeat(4) if model.num_classes else None
    with torch.autocast(next(model.parameters()).device.type, torch.bfloat16, enabled=args.amp):
        x = sample(model, 40, labels, args.steps[0], args.guidance[0], args.seed, args.solver[0], path, guide)
    return grid_image(x)


def sweep_figure(model, args, guide=None):
    """One row of ten digits (class: 0 to 9) for each solver, steps and guidance listed, all from the
    same starting noise, so that rows differ only by those settings."""
    labels, rows = torch.arange(10) if model.num_classes else None, []
    for solver, steps, guidance in itertools.product(args.solver, args.steps, args.guidance):
        with torch.autocast(next(model.parameters()).device.type, torch.bfloat16, enabled=args.amp):
            x = sample(model, 10, labels, steps, guidance, args.seed, solver, guide=guide)
        name = f"{solver}, steps {steps}" + (f", gamma {guidance}" if labels is not None or guide else "")
        rows.append((grid_image(x), name))
    img, draw = canvas(210 + rows[0][0].width, len(rows) * rows[0][0].height)
    for i, (row, label) in enumerate(rows):
        img.paste(row, (210, i * row.height))
        draw.text((200, (i + 0.5) * row.height), label, fill="black", anchor="rm")
    return img


def save_gif(path, frames, num_frames=40):
    """The sampling trajectory as an animated GIF: num_frames evenly spaced steps, then a pause.
    16 grey levels keep the noisy early frames compressible (about 600 KB instead of 2.6 MB)."""
    picks = sorted({round(k * (len(frames) - 1) / (num_frames - 1)) for k in range(num_frames)})
    images = [grid_image(frames[i]).point(lambda v: v // 16 * 17).convert("P") for i in picks]
    durations = [80] * (len(images) - 1) + [1500]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def canvas(width, height):
    """A white image and a pen with a legible font, for figures drawn with Pillow alone."""
    img = Image.new("RGB", (round(width), round(height)), "white")
    draw = ImageDraw.Draw(img)
    draw.font = ImageFont.load_default(13)
    return img, draw


def plot_loss(losses, steps_per_epoch, path, title):
    """Per-step loss (grey) and its running mean (black) on a log y axis, epochs apart in blue."""
    W, H, pad = 720, 420, 60
    img, draw = canvas(W, H)
    n, logs = len(losses), [math.log10(max(v, 1e-12)) for v in losses]
    lo, hi = math.floor(min(logs)), max(math.ceil(max(logs)), math.floor(min(logs)) + 1)
    px = lambda i: pad + (W - 2 * pad) * i / max(n - 1, 1)
    py = lambda y: pad + (H - 2 * pad) * (hi - y) / (hi - lo)
    for y in [e + math.log10(m) for e in range(lo, hi) for m in (1, 2, 5)] + [hi]:  # decades, 2x and 5x
        draw.line([(pad, py(y)), (W - pad, py(y))], fill=(190,) * 3 if y == int(y) else (225,) * 3)
        if y == int(y) or hi - lo <= 2:
            draw.text((pad - 8, py(y)), f"{10 ** y:g}", fill="black", anchor="rm")
    for k in range(math.ceil(n / steps_per_epoch)):  # epoch k + 1 labelled mid-span
        draw.line([(px(k * steps_per_epoch), pad), (px(k * steps_per_epoch), H - pad)], fill=(180, 180, 230))
        draw.text((px((k + 0.5) * steps_per_epoch), H - pad + 6), str(k + 1), fill="black", anchor="mt")
    window = max(1, n // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(n)]
    draw.line([(px(i), py(v)) for i, v in enumerate(logs)], fill=(170, 170, 170))
    draw.line([(px(i), py(math.log10(max(v, 1e-12)))) for i, v in enumerate(smooth)], fill="black", width=2)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    draw.text((W / 2, 20), title, fill="black", anchor="mm")
    draw.text((W / 2, H - 20), f"epoch ({steps_per_epoch} steps each, {n} in all); loss on a log scale",
              fill="black", anchor="mm")
    img.save(path)


def save_progress(epoch, args, model, optimizer, scheduler, losses, lrs, ema=None):
    """After each epoch: loss.csv, loss.png and ckpt.pt, everything a resumed run needs."""
    steps = len(losses) // epoch
    with open(os.path.join(args.out, "loss.csv"), "w") as f:
        f.write("step,epoch,loss,lr\n")
        f.writelines(f"{i + 1},{i // steps + 1},{v:.6f},{lrs[i // steps]:.6e}\n"
                     for i, v in enumerate(losses))
    title = f"{'DDPM' if args.method == 'ddpm' else 'flow matching'}, {args.cond}-conditioned UNet"
    plot_loss(losses, steps, os.path.join(args.out, "loss.png"), title)
    if epoch == args.epochs:  # the sampling weights alone, in half precision: what samples/ ships
        net = ema or model  # BatchNorm statistics stay fp32: a running variance can pass fp16's 65504
        params = dict(net.named_parameters())
        weights = {k: v.half() if k in params else v for k, v in net.state_dict().items()}
        save_checkpoint(os.path.join(args.out, "model.pt"),
                        {"script": SCRIPT, "epoch": epoch, "args": vars(args), "model": weights})
    save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
        "script": SCRIPT, "epoch": epoch, "args": vars(args), "model": model.state_dict(),
        "ema": ema.state_dict() if ema else None, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "losses": losses, "lrs": lrs, "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-save never leaves a broken ckpt."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict that this script wrote at path, or a ValueError that says what is wrong."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, pickle from elsewhere, not a torch file at all
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}): use another one") from e
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        raise ValueError(f"{path} is not a {SCRIPT} checkpoint")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """The UNet saved in a flow.py checkpoint (its EMA weights if it has them), on `device`, in eval mode."""
    ckpt = read_checkpoint(path, device)
    model = build_unet({**LATER_FLAGS, **ckpt["args"]})
    try:
        model.load_state_dict(ckpt.get("ema") or ckpt["model"])  # the averaged weights if trained with --ema
    except RuntimeError as e:
        raise ValueError(f"the weights in {path} do not fit the UNet its flags describe") from e
    return model.to(device, memory_format=torch.channels_last).eval()  # faster convolutions, as in training


# --- sample quality, measured: a small MNIST classifier's verdict on the samples ---


def make_classifier():
    """A small CNN for digits; all but its last layer give the 128 features the FD compares."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14 x 14
                         nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7 x 7
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def load_classifier(root, device, epochs=3, batch_size=128):
    """The classifier cached in root, trained there on first use (seed 0, Adam 1e-3 decayed to 0)."""
    path = os.path.join(root, "mnist_classifier.pt")
    torch.manual_seed(0)
    classifier = make_classifier().to(device)
    if os.path.exists(path):
        classifier.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return classifier.eval()
    (x_all, y_all), (x_test, y_test) = load_mnist(root, device), load_mnist(root, device, train=False)
    t0, steps = time.time(), len(x_all) // batch_size
    optimizer = torch.optim.Adam(classifier.train().parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, epochs * steps)  # linearly down to 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), device=device)
        for step in range(steps):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(classifier(x_all[idx].unsqueeze(1) / 255), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if (step + 1) % 100 == 0:
                print(f"\rtraining the classifier once, for {path}: epoch {epoch + 1}/{epochs}, "
                      f"step {step + 1}/{steps}, {time.time() - t0:.0f}s", end="", file=sys.stderr)
    accuracy = score(classifier.eval(), x_test.unsqueeze(1) / 255, y_test)[0]
    print(f"; test accuracy {accuracy:.4f}", file=sys.stderr)  # stdout keeps the table alone
    if accuracy < 0.99:
        raise ValueError(f"the classifier reached only {accuracy:.4f} test accuracy, too little to judge by")
    torch.save(classifier.state_dict(), path)
    return classifier.eval()


@torch.inference_mode()
def score(classifier, x, labels=None, batch_size=1000):
    """The classifier's verdict on digits x (N x 1 x 28 x 28 in [0, 1]): with labels, the fraction
    recognised as the digit asked for; without, the entropy of the predicted digits (ln 10 = 2.303
    when all ten come equally often). Also the mean confidence and the 128 features for the FD."""
    features = torch.cat([classifier[:-1](b.float()) for b in x.split(batch_size)])
    probs = classifier[-1](features).softmax(1)
    if labels is not None:
        value = (probs.argmax(1) == labels).float().mean().item()
    else:
        p = torch.bincount(probs.argmax(1), minlength=10) / len(x)
        value = -(p * p.log()).nansum().item()
    return value, probs.max(1).values.mean().item(), features


def frechet_distance(a, b):
    """Frechet distance of Gaussians fitted to feature sets a and b (N x d), in float64:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    def sqrtm(m):  # of a symmetric positive semi-definite matrix, by its eigendecomposition
        w, v = torch.linalg.eigh(m)
        return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T

    a, b = a.double(), b.double()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = sqrtm(s_a)
    return ((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace()
            - 2 * sqrtm(root @ s_b @ root).trace()).item()


def evaluate(model, args, device, guide=None, chunk=100):
    """Score args.evaluate samples: a table row for each solver, steps and guidance listed."""
    classifier, n = load_classifier(args.data, device), args.evaluate
    digits = lambda limit, train: load_mnist(args.data, device, limit, train)[0].unsqueeze(1) / 255
    real = score(classifier, digits(None, False))[2]  # the 10,000 test digits
    floor = frechet_distance(score(classifier, digits(n, True))[2], real)  # n real train digits
    labels = torch.arange(n, device=device) % 10 if model.num_classes else None  # n/10 of each digit
    measure = "accuracy" if model.num_classes else "entropy"
    print(f"{n} samples, seed {args.seed}; FD to the 10,000 test digits; floor: FD of {n} train digits\n"
          f"| solver | steps | NFE | guidance | {measure} | confidence | FD | floor | s |\n|" + " ---: |" * 9)
    guidances = args.guidance if model.num_classes or guide else ["-"]
    for solver, steps, guidance in itertools.product(args.solver, args.steps, guidances):
        t0, xs = time.time(), []
        for i in range(0, n, chunk):  # in chunks: CPUs run them faster
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                xs.append(sample(model, min(chunk, n - i), None if labels is None else labels[i:i + chunk],
                                 steps, guidance, args.seed + i, solver, guide=guide))
            done = i + len(xs[-1])  # progress on stderr, the table on stdout
            eta = (time.time() - t0) / done * (n - done)
            print(f"{solver}, {steps} steps: {done}/{n} samples, eta {eta:.0f}s", end="\r", file=sys.stderr)
        value, confidence, features = score(classifier, torch.cat(xs).clamp(0, 1), labels)
        nfe = steps * (2 if solver == "midpoint" else 1) * (2 if guide else 1)
        print(f"| {solver} | {steps} | {nfe} | {guidance} | {value:.4f} | {confidence:.4f} | "
              f"{frechet_distance(features, real):.2f} | {floor:.2f} | {time.time() - t0:.0f} |", flush=True)


# --- main --------------------------------------------------------------------


def from_checkpoint(args, device):
    """The modes that need no training: --evaluate and --sample-only."""
    model = load_checkpoint(args.ckpt or os.path.join(args.out or default_out(args), "ckpt.pt"), device)
    args.method, args.cond = model.method, "class" if model.num_classes else "time"
    guide = load_checkpoint(args.autoguide, device) if args.autoguide else None
    if guide and (guide.method, guide.num_classes) != (model.method, model.num_classes):
        raise ValueError(f"--autoguide needs a {model.method} {args.cond} model, as --ckpt is: "
                         f"{args.autoguide} is not one")
    sampling_defaults(args)
    if args.compile:
        model.compile()
    if args.evaluate:
        return evaluate(model, args, device, guide)
    out, t_sample, frames = args.out or default_out(args), time.time(), [] if args.gif else None
    prepare_out(out, resume=True)
    swept = [name for name in ("solver", "steps", "guidance") if len(getattr(args, name)) > 1]
    if swept:  # sweep_steps.png, sweep_solver_steps.png, ...: the name says which settings vary
        path = os.path.join(out, "_".join(["sweep"] + swept) + ".png")
        sweep_figure(model, args, guide).save(path)
    else:
        path = os.path.join(out, "samples.png")
        sample_grid(model, args, frames, guide).save(path)
    if frames:
        save_gif(os.path.join(out, "sampling.gif"), frames)
    print(f"wrote {path} in {time.time() - t_sample:.1f}s")


def default_out(args):
    """Runs go to runs/ (ignored by git); samples/ holds only the results the README shows."""
    return os.path.join("runs", f"{args.method}_{args.cond}")


def prepare_out(out, resume):
    """Make the output folder, checking it is writable and holds no run that would be overwritten."""
    try:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, ".write_test"), "w").close()
        os.remove(os.path.join(out, ".write_test"))
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror}): choose another folder") from e
    if not resume and os.path.exists(os.path.join(out, "ckpt.pt")):
        raise ValueError(f"{out} already holds a run: pass --resume {os.path.join(out, 'ckpt.pt')} "
                         "to continue it, or choose another --out")


def positive(kind):
    """An argparse type: a number of `kind` (int or float) above 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            what = "a whole number of at least 1" if kind is int else "a positive number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def number_list(kind):
    """An argparse type: '1,5,10' -> [1, 5, 10], each value made and checked by kind."""
    def parse(text):
        try:
            return [kind(v) for v in text.split(",")]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None
    return parse


def sampling_defaults(args):
    """--solver and --steps not given: the method's first solver; 300 steps, or 50 for a time-only flow."""
    args.solver = args.solver or SOLVERS[args.method][:1]
    args.steps = args.steps or [50 if (args.method, args.cond) == ("flow", "time") else 300]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Flow matching or DDPM on MNIST, with time or class input.",
                                     epilog="--sample-only and --evaluate sweep comma-separated lists.")
    add = parser.add_argument
    # model and objective
    add("--method", choices=["flow", "ddpm"], default="flow", help="flow matching or DDPM (default: flow)")
    add("--cond", choices=["time", "class"], default="class", help="time, or time and digit (default: class)")
    add("--hidden", type=positive(int), default=64, metavar="D", help="UNet width D (default: %(default)s)")
    add("--p-uncond", type=float, default=0.1, help="class dropout, Alg. B.3 (default: %(default)s)")
    # better time input, opt-in: the assignment's UNet sees t raw, in two places
    add("--sinusoidal-t", action="store_true", help="feed sin and cos of t at 16 frequencies (default: off)")
    add("--time-every-block", action="store_true", help="t scales and shifts every block (default: off)")
    add("--logit-normal-t", action="store_true", help="train on t = sigmoid(N(0, 1)) (default: off)")
    # optimisation
    add("--epochs", type=positive(int), default=10, metavar="N", help="epochs (default: 10; ddpm 20)")
    add("--batch-size", type=positive(int), default=64, metavar="N", help="batch (default: 64; ddpm 128)")
    add("--lr", type=positive(float), default=0.01, help="Adam's, falls to 1/10 (default: 0.01; ddpm 0.001)")
    add("--limit", type=positive(int), metavar="N", help="train on the first N images (default: all 60,000)")
    add("--ema", type=float, default=0, metavar="DECAY", help="sample from an EMA, e.g. 0.999 (default: off)")
    # sampling
    add("--steps", type=number_list(positive(int)), metavar="N", help="steps (default: 50; class, ddpm 300)")
    add("--guidance", type=number_list(float), default=[5.0], metavar="G", help="Alg. B.4 gamma (default: 5)")
    add("--autoguide", metavar="CKPT", help="guide away from this weaker model, by --guidance (default: off)")
    add("--solver", type=number_list(str), help="euler or midpoint; ddpm: ddpm or ddim (default: the first)")
    add("--sample-epochs", type=number_list(positive(int)), default="1,5,10", metavar="LIST",
        help="epochs with a sample grid, and the last (default: 1,5,10; ddpm 1,5,10,20)")
    add("--gif", action="store_true", help="also write sampling.gif, the last grid's path (default: off)")
    # input, output, system
    add("--data", default="data", help="MNIST root, downloaded if missing (default: %(default)s)")
    add("--out", help="output folder (default: runs/<method>_<cond>)")
    add("--resume", metavar="CKPT", help="continue training from this checkpoint (default: start afresh)")
    add("--sample-only", action="store_true", help="no training: a grid from --ckpt (default: off)")
    add("--evaluate", type=positive(int), metavar="N", help="no training: score N samples (default: off)")
    add("--ckpt", help="checkpoint (or model.pt) to sample or score (default: OUT/ckpt.pt)")
    add("--amp", action="store_true", help="bfloat16 autocast for training and sampling (default: off, fp32)")
    add("--compile", action="store_true", help="torch.compile the UNet; slow to start (default: off)")
    add("--benchmark", action="store_true", help="time 30 training steps and a grid, exit (default: off)")
    add("--log-every", type=positive(int), default=100, help="steps between log lines (default: %(default)s)")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="auto: cuda, mps or cpu")
    add("--seed", type=int, default=180, help="random seed for training and sampling (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.method == "ddpm":  # the DDPM version's defaults, for the flags not given
        parser.set_defaults(epochs=20, batch_size=128, lr=1e-3, sample_epochs="1,5,10,20")
        args = parser.parse_args(argv)
    if not 0 <= args.p_uncond <= 1:
        parser.error(f"--p-uncond must lie in [0, 1], got {args.p_uncond}")
    if args.logit_normal_t and args.method == "ddpm":
        parser.error("--logit-normal-t is for flow matching: DDPM draws t from 1..300")
    no_training = args.sample_only or args.evaluate
    solvers = SOLVERS["flow"] + SOLVERS["ddpm"] if no_training else SOLVERS[args.method]
    if set(args.solver or []) - set(solvers):
        parser.error(f"--solver takes {' or '.join(solvers)}, got {','.join(args.solver)}")
    sweep = len(args.solver or [0]) * len(args.steps or [0]) * len(args.guidance) > 1
    if sweep and not no_training:
        parser.error("lists of --solver, --steps or --guidance are for --sample-only and --evaluate")
    if args.autoguide and not no_training:
        parser.error("--autoguide is for --sample-only and --evaluate")
    if args.gif and (sweep or args.evaluate):
        parser.error("--gif animates one grid: not with --evaluate or lists of settings")

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = next(d for d in available if available[d]) if args.device == "auto" else args.device
    if not available[device]:
        parser.error(f"--device {device} is not available on this machine: use --device auto")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once, keeps the fastest
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as cuDNN's convolutions already use
    device = torch.device(device)
    torch.manual_seed(args.seed)
    try:
        if no_training:
            return from_checkpoint(args, device)
        sampling_defaults(args)
        args.out = args.out or default_out(args)
        if not args.benchmark:
            prepare_out(args.out, args.resume)
        train(args, device)
    except ValueError as e:
        sys.exit(f"flow.py: error: {e}")


if __name__ == "__main__":
    main()
