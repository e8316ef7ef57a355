"""
Flow matching on MNIST, from scratch, in one file.

A UNet u_theta(x_t, t, c) learns the velocity of straight paths from Gaussian noise x0 to digits x1:
x_t = (1 - t) x0 + t x1 moves at u = x1 - x0 (eq. B.3, B.4), so training is plain regression (eq.
B.5). Sampling integrates dx/dt = u_theta from t = 0 (noise) to t = 1 (a digit) with Euler steps;
with classes, classifier-free guidance mixes the conditional and unconditional velocities. The code
first tells the course assignment (its Part 2; Part 1 is denoise.py), a complete program read top to
bottom: the text above the banner "beyond the assignment", saved as a file of its own with a last line
assignment(), runs it. Below the banner, each section adds what goes further, and main() hands the
runs that use the assignment's flags alone to the assignment's run().

    python flow.py --sample-only --ckpt samples/flow_class/model.pt --steps 10 --guidance 2   # seconds
    python flow.py --cond class --epochs 10    # the assignment's run, 4 of each digit -> runs/flow_class
    python flow.py --cond time --epochs 10     # time-only, 40 unconditional digits -> runs/flow_time
    python flow.py --hidden 16 --batch-size 16 --epochs 2 --limit 20000 --ema 0.999 --sinusoidal-t \\
        --time-every-block --logit-normal-t --steps 10 --guidance 2 --out runs/cpu   # a CPU's, 2 minutes
    python flow.py --evaluate 1000 --ckpt samples/flow_class/model.pt --steps 10 --guidance 2   # scores
    python flow.py --predictions --ckpt samples/flow_class/model.pt   # x_t beside the network's guess of x1
    python flow.py --score mine.pt   # digits your own code saved (N x 1 x 28 x 28 in [0, 1]), scored alike
    python flow.py --likelihood 1000 --steps 60 --ckpt samples/flow_density/model.pt   # bits/dim, 10 minutes

Outputs, in --out (default runs/<method>_<cond>[_reflow]), after every epoch: loss.csv, loss.png and ckpt.pt
(--resume it after a crash); samples_epochNN.png after the --sample-epochs and the last; model.pt at
the end. --benchmark times your machine; samples/README.md gives every run's wall time.
"""
import argparse
import contextlib
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


class UNet(nn.Module):
    """u_theta(x_t, t, c). num_classes=0 conditions on time only; num_classes=10 adds the
    digit class as a one-hot c, where c = 0 means "no class" (for classifier-free guidance)."""

    def __init__(self, hidden=64, num_classes=0):
        super().__init__()
        D, self.num_classes = hidden, num_classes
        self.conv_in = ConvBlock(1, D)
        self.down1 = DownBlock(D, D)
        self.down2 = DownBlock(D, 2 * D)
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())  # 2D x 7 x 7 -> 2D x 1 x 1
        self.unflatten = bn_gelu(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7, 0))  # back to 7 x 7
        self.up1 = UpBlock(4 * D, D)
        self.up2 = UpBlock(2 * D, D)
        self.conv_out = nn.Sequential(ConvBlock(2 * D, D), nn.Conv2d(D, 1, 3, 1, 1))
        self.fc1_t, self.fc2_t = FCBlock(1, 2 * D), FCBlock(1, D)
        if num_classes:
            self.fc1_c, self.fc2_c = FCBlock(num_classes, 2 * D), FCBlock(num_classes, D)

    def forward(self, x_t, t, c=None):
        # x_t: B x 1 x 28 x 28, t: B x 1 in [0, 1], c: B x num_classes one-hot (or zeros)
        # the assignment's names: Flatten is an average pool; tensors unflatten and up1 take their ops' names
        e0 = self.conv_in(x_t)  # D x 28 x 28
        e1 = self.down1(e0)  # D x 14 x 14
        e2 = self.down2(e1)  # 2D x 7 x 7
        unflatten = self.unflatten(self.flatten(e2))  # 2D x 7 x 7
        t1, t2 = self.fc1_t(t)[..., None, None], self.fc2_t(t)[..., None, None]
        if self.num_classes:
            c1, c2 = self.fc1_c(c)[..., None, None], self.fc2_c(c)[..., None, None]
            unflatten = c1 * unflatten + t1
        else:
            unflatten = unflatten * t1
        up1 = self.up1(torch.cat([e2, unflatten], 1))  # D x 14 x 14
        if self.num_classes:
            up1 = c2 * up1 + t2
        else:
            up1 = up1 * t2
        up2 = self.up2(torch.cat([e1, up1], 1))  # D x 28 x 28
        return self.conv_out(torch.cat([e0, up2], 1))  # 1 x 28 x 28


# --- flow matching: the loss (Algorithms B.1, B.3) and the sampler (Algorithms B.2, B.4) ---


def class_input(model, labels, p_uncond):
    """Training's one-hot classes, each dropped to c = 0 with probability p_uncond (Alg. B.3); or None."""
    if labels is None:
        return None
    keep = torch.rand(len(labels), 1, device=labels.device) >= p_uncond
    return F.one_hot(labels, model.num_classes).float() * keep


def flow_matching_loss(model, x1, labels=None, p_uncond=0.1, x0=None, t=None):
    """Mean squared error between u_theta(x_t, t, c) and the path's velocity x1 - x0 (eq. B.5), for noise
    x0 and times t drawn fresh (Alg. B.1) unless given."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    t = torch.rand(x1.shape[0], 1, device=x1.device) if t is None else t
    x_t = (1 - t[:, :, None, None]) * x0 + t[:, :, None, None] * x1  # eq. B.3
    return F.mse_loss(model(x_t, t, class_input(model, labels, p_uncond)), x1 - x0)


def model_output(model, x, t, c=None, guidance=1.0):
    """The network's output at x (every image) and time t (a number): u_theta(x, t, c); with c, guided by
    classifier-free guidance (Algorithm B.4), the conditional and the unconditional half (c = 0) in one
    batch."""
    t_batch = torch.full((x.shape[0], 1), t, device=x.device)  # B x 1, as the UNet takes it
    if c is None or guidance == 1:
        return model(x, t_batch, c).float()  # fp32 under --amp
    both = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([c, 0 * c])).float()
    u_cond, u_uncond = both.chunk(2)
    return u_uncond + guidance * (u_cond - u_uncond)


def euler_step(field, x, i, steps):
    """Step i of Algorithm B.2: x <- x + (1/T) u_theta(x, i/T), with T = steps; field(x, t) gives u_theta,
    guided (Algorithm B.4) or not."""
    dt = 1.0 / steps
    return x + dt * field(x, i * dt)


@torch.inference_mode()
def sample(model, n, labels=None, steps=50, guidance=5.0, seed=0, step_fn=euler_step, trajectory=None,
           amp=False):
    """n digits from noise x0 ~ N(0, I), `steps` steps of step_fn from t = 0 to 1 (Algorithm B.2). labels
    (a LongTensor of classes 0 to 9) turns on classifier-free guidance of weight `guidance` (Algorithm B.4).
    `trajectory`, if a list, receives x at t = 0, 1/steps, ..., 1, on the model's device. amp: the network
    runs under --amp's autocast (below)."""
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics
    device = next(model.parameters()).device
    c = None if labels is None else F.one_hot(labels.to(device), model.num_classes).float()
    field = lambda x, t: model_output(model, x, t, c, guidance)  # what the steps follow
    # the noise comes from the CPU's random stream, seeded and forked: the seed draws the same digits on
    # every device, and training's streams are left where they were
    with torch.random.fork_rng(devices=[]), autocast(device, amp):
        torch.manual_seed(seed)
        x = torch.randn(n, 1, 28, 28).to(device)  # x0
        for i in range(steps):
            if trajectory is not None:
                trajectory.append(x)
            x = step_fn(field, x, i, steps)
    if trajectory is not None:
        trajectory.append(x)
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


def to_float(images):
    return images.unsqueeze(1).float() / 255  # N x 28 x 28 uint8 -> N x 1 x 28 x 28 in [0, 1]


# --- device and precision: CUDA, Apple's MPS or the CPU, each with what it can do ---


def pick_device(name):
    """--device: auto takes cuda, then mps, then cpu; a device this machine lacks is a ValueError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name
    if not available[name]:
        raise ValueError(f"--device {name} is not available on this machine: use --device auto")
    return torch.device(name)


def amp_problem(device):
    """Why --amp (bfloat16 autocast) cannot run on device, or None where it can."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):  # a T4 is 7.5
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 convolutions (compute capability 8.0+)"
    if device.type == "mps" and torch.__version__ < "2.6":
        return f"bfloat16 autocast on MPS needs torch 2.6 or newer, not {torch.__version__}"
    return None


def autocast(device, amp):
    """bfloat16 autocast under --amp; without it, no autocast context at all (MPS had none before 2.5)."""
    return torch.autocast(device.type, torch.bfloat16) if amp else contextlib.nullcontext()


def to_device(model, device):
    """model on device, in channels-last memory (convolutions run faster in it); on MPS in the default
    layout, since BatchNorm computes wrong answers there in channels-last."""
    model = model.to(device)
    return model if torch.device(device).type == "mps" else model.to(memory_format=torch.channels_last)


def random_streams(device):
    """The CPU's random stream and the device's own, for a checkpoint: a resumed run draws on from them."""
    streams = {"rng_cpu": torch.get_rng_state()}
    if device.type != "cpu":
        streams["rng_" + device.type] = getattr(torch, device.type).get_rng_state()  # torch.cuda, torch.mps
    return streams


def restore_random_streams(streams, device):
    """Set the streams that random_streams saved (a device's own only if it saved that device's)."""
    torch.set_rng_state(streams["rng_cpu"].cpu())
    if device.type != "cpu" and streams.get("rng_" + device.type) is not None:
        getattr(torch, device.type).set_rng_state(streams["rng_" + device.type].cpu())

# --- training ----------------------------------------------------------------


def train_epoch(model, optimizer, data, epoch, args, loss_fn=flow_matching_loss):
    """One pass over data in a fresh random order; returns the per-step losses. data holds the images,
    their labels, and any more per-image tensors, whose batches go to loss_fn as arguments after p_uncond."""
    device, batches = data[0].device, len(data[0]) // args.batch_size  # the last partial batch is dropped
    model.train()
    perm = torch.randperm(len(data[0]), device=device)
    losses = torch.zeros(batches, device=device)  # read back at log steps only: no sync per step
    started = time.time()
    for step in range(batches):
        images, labels, *more = (d[perm[step * args.batch_size:(step + 1) * args.batch_size]] for d in data)
        x1 = to_float(images)
        with autocast(device, args.amp):
            loss = loss_fn(model, x1, labels if model.num_classes else None, args.p_uncond, *more)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if (step + 1) % args.log_every == 0 or step + 1 == batches:
            log_progress(losses[:step + 1].cpu(), batches, epoch, args, optimizer, time.time() - started)
    return losses.tolist()


def log_progress(losses, batches, epoch, args, optimizer, seconds):
    """A log line after the epoch's losses so far, with the speed and the time left; stops the run at a
    loss that is no longer finite."""
    if not losses.isfinite().all():
        first = int((~losses.isfinite()).nonzero()[0])
        kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no checkpoint exists yet"
        at = (epoch - 1) * batches + first + 1
        raise ValueError(f"the loss became {losses[first].item()} at step {at}; {kept}; try a lower --lr")
    done = len(losses)
    eta = seconds / done * ((args.epochs - epoch + 1) * batches - done)
    print(f"epoch {epoch:3d}/{args.epochs} | step {done:5d}/{batches} | loss {losses[-1].item():.4f} | "
          f"lr {optimizer.param_groups[0]['lr']:.2e} | {done * args.batch_size / seconds:6.0f} img/s | "
          f"eta {eta / 60:5.1f} min", flush=True)


def train(args, model, optimizer, data, loss_fn=flow_matching_loss, step_fn=euler_step, net=None):
    """args.epochs epochs of train_epoch, Adam's rate multiplied by 0.1 ** (1 / epochs) after each (the
    assignment's schedule); after each epoch the loss, its plot and ckpt.pt, and a grid after the
    --sample-epochs and the last. The defaults are the assignment's; a caller may train another loss_fn,
    sample the grids with another step_fn, or have another network `net` draw them and go into model.pt
    (a copy of model whose weights follow model's)."""
    net = model if net is None else net
    if len(data[0]) < args.batch_size:
        raise ValueError(f"{len(data[0])} images are fewer than --batch-size {args.batch_size}: "
                         "lower it, or raise --limit")
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.1 ** (1 / args.epochs))  # once an epoch
    losses, lrs, start_epoch = [], [], 1
    if args.resume:
        losses, lrs, start_epoch = resume(args, model, optimizer, scheduler)
    batches = len(data[0]) // args.batch_size
    print(f"{args.cond}-conditioned UNet, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(data[0]):,} images, {batches} steps per epoch, device {data[0].device}")
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        lrs.append(optimizer.param_groups[0]["lr"])
        losses += train_epoch(model, optimizer, data, epoch, args, loss_fn)
        scheduler.step()
        save_progress(epoch, args, model, optimizer, scheduler, losses, lrs, net)
        mean_loss = sum(losses[-batches:]) / batches
        msg = f"epoch {epoch} done in {time.time() - started:.1f}s, mean loss {mean_loss:.4f}"
        if epoch in args.sample_epochs or epoch == args.epochs:
            started = time.time()
            trajectory = [] if args.gif and epoch == args.epochs else None  # --gif: the last grid's steps
            name = f"samples_epoch{epoch:02d}.png"
            sample_grid(net, args, trajectory, step_fn).save(os.path.join(args.out, name))
            if trajectory:
                save_gif(os.path.join(args.out, "sampling.gif"), trajectory)
            msg += f"; wrote {name} in {time.time() - started:.1f}s"
        print(msg, flush=True)


def resume(args, model, optimizer, scheduler):
    """Load args.resume into the model, optimizer, scheduler and the random streams.
    Returns the losses and learning rates so far and the epoch to continue with."""
    device = next(model.parameters()).device
    ckpt = read_checkpoint(args.resume, device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    restore_random_streams(ckpt, device)
    print(f"resumed {args.resume} after epoch {ckpt['epoch']}")
    return ckpt["losses"], ckpt["lrs"], ckpt["epoch"] + 1


# --- outputs: sample grids, the loss curve, checkpoints ----------------------


def grid_image(x, nrow=10, zoom=2):
    """A PIL image of the digits in x (N x 1 x 28 x 28), nrow per row, enlarged `zoom` times."""
    grid = torchvision.utils.make_grid(x.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=0.5)
    img = Image.fromarray(grid[0].mul(255).round().byte().numpy())
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)


def sample_grid(model, args, trajectory=None, step_fn=euler_step):
    """The assignment's figure: 40 digits; with classes, column k holds 4 samples of digit k."""
    labels = torch.arange(10).repeat(4) if model.num_classes else None
    return grid_image(sample(model, 40, labels, args.steps, args.guidance, args.seed, step_fn, trajectory,
                             args.amp))


def save_gif(path, frames, num_frames=40):
    """A sampling trajectory as an animated GIF: num_frames evenly spaced steps, then a pause.
    16 grey levels keep the noisy early frames compressible."""
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


def plot_loss(losses, batches, path, title):
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
    for k in range(math.ceil(n / batches)):  # epoch k + 1 labelled mid-span
        draw.line([(px(k * batches), pad), (px(k * batches), H - pad)], fill=(180, 180, 230))
        draw.text((px((k + 0.5) * batches), H - pad + 6), str(k + 1), fill="black", anchor="mt")
    window = max(1, n // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(n)]
    draw.line([(px(i), py(v)) for i, v in enumerate(logs)], fill=(170, 170, 170))
    draw.line([(px(i), py(math.log10(max(v, 1e-12)))) for i, v in enumerate(smooth)], fill="black", width=2)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    draw.text((W / 2, 20), title, fill="black", anchor="mm")
    draw.text((W / 2, H - 20), f"epoch ({batches} steps each, {n} in all); loss on a log scale",
              fill="black", anchor="mm")
    img.save(path)


def save_progress(epoch, args, model, optimizer, scheduler, losses, lrs, net):
    """After each epoch: loss.csv, loss.png and ckpt.pt, everything a resumed run needs; after the last,
    model.pt, net's weights alone in half precision: what samples/ ships."""
    batches = len(losses) // epoch
    with open(os.path.join(args.out, "loss.csv"), "w") as f:
        f.write("step,epoch,loss,lr\n")
        f.writelines(f"{i + 1},{i // batches + 1},{v:.6f},{lrs[i // batches]:.6e}\n"
                     for i, v in enumerate(losses))
    title = f"training loss, {args.cond}-conditioned UNet"
    plot_loss(losses, batches, os.path.join(args.out, "loss.png"), title)
    if epoch == args.epochs:  # BatchNorm statistics stay fp32: a running variance can pass fp16's 65504
        params = dict(net.named_parameters())
        weights = {k: v.half() if k in params else v for k, v in net.state_dict().items()}
        save_checkpoint(os.path.join(args.out, "model.pt"),
                        {"script": SCRIPT, "epoch": epoch, "args": vars(args), "model": weights})
    save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
        "script": SCRIPT, "epoch": epoch, "args": vars(args), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "losses": losses,
        "lrs": lrs, **random_streams(next(model.parameters()).device)})


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


# --- the program: the assignment's flags, its run, and resuming one ---------

TRAINING_FLAGS = ["cond", "hidden", "p_uncond", "batch_size", "epochs", "lr", "limit"]  # a resume keeps them


def positive(kind):
    """An argparse type: a number of `kind` (int or float) above 0."""
    def convert(text):
        if not kind(text) > 0:  # argparse turns a ValueError into "invalid positive int value: '0'"
            raise ValueError(text)
        return kind(text)
    convert.__name__ = f"positive {kind.__name__}"
    return convert


def number_list(kind):
    """An argparse type: '1,5,10' -> [1, 5, 10], each value made and checked by kind."""
    def convert(text):
        try:
            return [kind(v) for v in text.split(",")]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None
    return convert


def assignment_parser():
    """The assignment's flags in two groups, each --help with its default."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument_group("the assignment").add_argument
    add("--cond", choices=["time", "class"], default="class", help="time, or time and digit (default: class)")
    add("--hidden", type=positive(int), default=64, metavar="D", help="UNet width D (default: %(default)s)")
    add("--p-uncond", type=float, default=0.1, metavar="P", help="class dropout, Alg. B.3 (default: 0.1)")
    add("--epochs", type=positive(int), default=10, metavar="N", help="epochs (default: %(default)s)")
    add("--batch-size", type=positive(int), default=64, metavar="N", help="batch (default: %(default)s)")
    add("--lr", type=positive(float), default=0.01,
        help="Adam's, times 0.1 ** (1 / epochs) after each epoch (default: %(default)s)")
    add("--limit", type=positive(int), metavar="N", help="train on the first N images (default: all 60,000)")
    add("--steps", type=positive(int), metavar="N", help="Euler steps of a grid (default: 50; class 300)")
    add("--guidance", type=float, default=5.0, metavar="G",
        help="Alg. B.4's gamma, for --cond class (default: %(default)s)")
    add("--sample-epochs", type=number_list(positive(int)), default="1,5,10", metavar="LIST",
        help="epochs with a sample grid, and the last (default: %(default)s)")
    add("--gif", action="store_true", help="also write sampling.gif, the last grid's sampling (default: off)")
    add = parser.add_argument_group("input, output, system").add_argument
    add("--data", default="data", help="MNIST root, downloaded if missing (default: %(default)s)")
    add("--out", help="output folder (default: one in runs/ named after the run; with --resume, its folder)")
    add("--resume", metavar="CKPT", help="continue this run, its training flags kept (default: off)")
    add("--amp", action="store_true", help="bfloat16 autocast: CUDA 8.0+ (not a T4), MPS with torch 2.6+, "
        "CPUs (slow without AVX-512 BF16 or AMX) (default: off, fp32)")
    add("--log-every", type=positive(int), default=100, metavar="N", help="steps a log line (default: 100)")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
        help="auto: cuda, then mps, then cpu (default: auto)")
    add("--seed", type=int, default=180, help="random seed for training and sampling (default: %(default)s)")
    return parser


def parse(parser, argv=None):
    """The flags, checked; with --resume, the training flags of its checkpoint (one typed otherwise is
    refused). Then the device, its precision and the seed, decided once. Returns args and the device."""
    args = parser.parse_args(argv)
    if not 0 <= args.p_uncond <= 1:
        parser.error(f"--p-uncond must lie in [0, 1], got {args.p_uncond}")
    try:
        if args.resume:
            ckpt = take_flags(parser, argv, args, args.resume, TRAINING_FLAGS, "to resume")
            if "optimizer" not in ckpt:
                raise ValueError(f"{args.resume} holds weights alone: resume from a run's ckpt.pt")
        device = pick_device(args.device)
        if args.amp and amp_problem(device):
            raise ValueError(f"--amp: {amp_problem(device)}; run without --amp (fp32)")
    except ValueError as e:
        parser.error(str(e))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once, keeps the fastest
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as cuDNN's convolutions already use
    torch.manual_seed(args.seed)
    return args, device


def take_flags(parser, argv, args, path, keys, purpose):
    """Set these flags of args to the values that the checkpoint at path was trained with (a flag newer
    than it: the default, off), and return the checkpoint; a flag typed otherwise is a ValueError."""
    ckpt = read_checkpoint(path)
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(keys)))  # a flag not typed: None
    for key in keys:
        old = ckpt["args"].get(key, parser.get_default(key))
        if getattr(typed, key) not in (None, old):
            raise ValueError(f"{path} was trained {as_typed(key, old)}, not "
                             f"{as_typed(key, getattr(typed, key))}: leave it out {purpose}")
        setattr(args, key, old)
    return ckpt


def as_typed(key, value):
    """A flag's value as one would type it: 'with --lr 0.01', 'with --gif', 'without --limit'."""
    flag = "--" + key.replace("_", "-")
    if value is True or value is False or value is None:
        return f"with {flag}" if value is True else f"without {flag}"
    return f"with {flag} {value}"


def prepare_out(args):
    """Make args.out, checking that it is writable and holds no run but the one resumed."""
    writable(args.out)
    ckpt = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt) and not (args.resume and os.path.samefile(ckpt, args.resume)):
        raise ValueError(f"{args.out} already holds a run: pass --resume {ckpt} to continue it, "
                         "or choose another --out")


def writable(out):
    """Make the folder out, or a ValueError that says it cannot be written to."""
    try:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, ".write_test"), "w").close()
        os.remove(os.path.join(out, ".write_test"))
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror}): choose another folder") from e


def run(args, device):
    """One run of the assignment from its parsed flags: the UNet, Adam and its schedule, MNIST, train()."""
    # the assignment's step counts, the course's choice more than a need: at gamma 5 the class model's
    # digits score as well from 5 Euler steps on (samples/README.md, "Steps at gamma 5")
    args.steps = args.steps or (300 if args.cond == "class" else 50)
    args.out = args.out or (os.path.dirname(args.resume) if args.resume else f"runs/flow_{args.cond}")
    prepare_out(args)
    model = to_device(UNet(args.hidden, 10 if args.cond == "class" else 0), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train(args, model, optimizer, load_mnist(args.data, device, args.limit))


def assignment(argv=None):
    """The assignment's program, whole in the text above the banner below: assignment(["--epochs", "10"])
    runs what python flow.py --epochs 10 runs."""
    args, device = parse(assignment_parser(), argv)
    try:
        run(args, device)
    except ValueError as e:
        sys.exit(f"flow.py: error: {e}")


# ============================== beyond the assignment ==============================
# Each section builds on the assignment's functions above. main() at the end wires both halves.

# --- better time input: sin and cos of t, and t in every block (opt-in) ------
# The assignment's UNet sees t raw, in two places. --sinusoidal-t feeds its FCBlocks sin and cos of t at 16
# frequencies; --time-every-block scales and shifts the channels of every encoder and decoder block by amounts
# made from t; --logit-normal-t trains more often near t = 1/2, where the velocity is hardest to guess.

def time_features(t, n=16):
    """sin and cos of t at n frequencies from 1 to 1000 radians per unit of t: B x 1 -> B x 2n."""
    freqs = torch.logspace(0, 3, n, device=t.device)
    return torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], 1)


class TimeUNet(UNet):
    """The UNet with either or both time changes; film[i], made zero at first (each block starts as the
    plain UNet's), gives block i of conv_in, down1, down2, up1, up2 its scale and shift."""

    def __init__(self, hidden=64, num_classes=0, sinusoidal_t=False, time_every_block=False):
        super().__init__(hidden, num_classes)
        D, t_dim, self.sinusoidal_t = hidden, 32 if sinusoidal_t else 1, sinusoidal_t
        self.fc1_t, self.fc2_t = FCBlock(t_dim, 2 * D), FCBlock(t_dim, D)
        self.film = None
        if time_every_block:
            self.film = nn.ModuleList(nn.Linear(t_dim, 2 * n) for n in (D, D, 2 * D, D, D))
            for layer in self.film:
                nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def time_film(self, i, h, t_in):
        """h * (1 + scale) + shift with the scale and shift of block i made from the time input; h itself
        without film."""
        if self.film is None:
            return h
        scale, shift = self.film[i](t_in)[..., None, None].chunk(2, 1)
        return h * (1 + scale) + shift

    def forward(self, x_t, t, c=None):  # UNet.forward, with time_film after each block
        t_in = time_features(t) if self.sinusoidal_t else t  # what the time layers take
        e0 = self.time_film(0, self.conv_in(x_t), t_in)
        e1 = self.time_film(1, self.down1(e0), t_in)
        e2 = self.time_film(2, self.down2(e1), t_in)
        unflatten = self.unflatten(self.flatten(e2))
        t1, t2 = self.fc1_t(t_in)[..., None, None], self.fc2_t(t_in)[..., None, None]
        if self.num_classes:
            c1, c2 = self.fc1_c(c)[..., None, None], self.fc2_c(c)[..., None, None]
            unflatten = c1 * unflatten + t1
        else:
            unflatten = unflatten * t1
        up1 = self.up1(torch.cat([e2, unflatten], 1))
        up1 = self.time_film(3, c2 * up1 + t2 if self.num_classes else up1 * t2, t_in)
        up2 = self.time_film(4, self.up2(torch.cat([e1, up1], 1)), t_in)
        return self.conv_out(torch.cat([e0, up2], 1))


def logit_normal_loss(model, x1, labels=None, p_uncond=0.1, x0=None):
    """flow_matching_loss at t = sigmoid(N(0, 1)): more often near 1/2 than near 0 or 1. x0 as there."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    t = torch.randn(x1.shape[0], 1, device=x1.device).sigmoid()
    return flow_matching_loss(model, x1, labels, p_uncond, x0, t)


# --- EMA: sample from an exponential moving average of the weights (opt-in) ---

@torch.no_grad()
def update_ema(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model for the weights, d = min(decay, (1 + step) / (10 + step)): early
    steps forget faster, so the random initial weights do not linger. BatchNorm statistics: below."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one call for all


@torch.no_grad()
def measure_batchnorm(ema, loss_fn, data, args, batches=20, batch_size=256):
    """The EMA's BatchNorm statistics, measured afresh on `batches` training inputs: the raw model's
    fit the raw weights, not their average."""
    norms = [m for m in ema.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    ema.train()  # BatchNorm normalises by, and records, each batch's own statistics
    device, streams = data[0].device, random_streams(data[0].device)
    for _ in range(batches):
        idx = torch.randint(len(data[0]), (min(batch_size, len(data[0])),), device=device)
        images, labels, *more = (d[idx] for d in data)
        with autocast(device, args.amp):
            loss_fn(ema, to_float(images), labels if ema.num_classes else None, args.p_uncond, *more)
    restore_random_streams(streams, device)  # training draws the same random numbers as without an EMA
    for m in norms:
        m.momentum = 0.1
    ema.eval()


def keep_ema(optimizer, model, data, loss_fn, args):
    """A copy of model that the optimizer keeps as the average of model's weights: updated after each of its
    steps, its BatchNorm statistics measured after each epoch's last, saved and resumed in the optimizer's
    state_dict (PyTorch's optimizer hooks), so the assignment's loop and checkpoints stay as they are."""
    ema, updates, batches = copy.deepcopy(model).requires_grad_(False), 0, len(data[0]) // args.batch_size

    def after_step(optimizer, *_):
        nonlocal updates
        update_ema(ema, model, args.ema, updates)
        updates += 1
        if updates % batches == 0:  # an epoch's last step
            measure_batchnorm(ema, loss_fn, data, args)

    def load(optimizer, state):
        nonlocal updates
        if "ema" not in state:  # written before the optimizer kept the EMA
            raise ValueError("this checkpoint keeps its EMA outside the optimizer: train afresh to resume")
        ema.load_state_dict(state["ema"])
        updates = state["ema_updates"]

    optimizer.register_step_post_hook(after_step)
    optimizer.register_state_dict_post_hook(lambda opt, state: {**state, "ema": ema.state_dict(),
                                                                "ema_updates": updates})
    optimizer.register_load_state_dict_pre_hook(load)
    return ema


# --- DDPM on the same UNet: the assignment's optional extension, as the course's earlier DDPM version had it
# DDPM runs the other way, from noise level NOISE_LEVELS (mostly noise: x = 0.22 x1 + 0.98 eps with these
# betas; sampling starts from N(0, I)) down to 0 (the digit): its paper's t.
# The UNet's time input is level / NOISE_LEVELS, so there 1 is noise, where flow matching's t = 1 is the
# digit. Its paper calls the digit x0; here x1 is always the digit, and the noise is eps, as there.
# x = sqrt(a) x1 + sqrt(1 - a) eps with a = alpha_bar[level]: an affine mix like flow matching's, but not
# straight, and the UNet predicts the noise eps, not a velocity. sample() runs ddpm_step as it runs
# euler_step, step i of `steps`, which ddpm_step maps to noise levels; its field is then eps_theta.
NOISE_LEVELS = 300


@functools.cache  # made once per device, not at every training or sampling step
@torch.inference_mode(False)  # a plain tensor even if first made while sampling, so training can use it
def alpha_bar(device="cpu"):
    """alpha_bar[k] = prod_{j <= k} (1 - beta_j) for levels k = 0..NOISE_LEVELS, with betas evenly
    spaced from 1e-4 to 0.02."""
    betas = torch.linspace(1e-4, 0.02, NOISE_LEVELS, device=device)
    return torch.cat([torch.ones(1, device=device), torch.cumprod(1 - betas, 0)])


def ddpm_loss(model, x1, labels=None, p_uncond=0.1):
    """Mean squared error between eps_theta(x, level / NOISE_LEVELS, c) and the noise eps that made x."""
    eps = torch.randn_like(x1)
    level = torch.randint(1, NOISE_LEVELS + 1, (x1.shape[0], 1), device=x1.device)
    a = alpha_bar(x1.device)[level][:, :, None, None]
    x = a.sqrt() * x1 + (1 - a).sqrt() * eps
    return F.mse_loss(model(x, level / NOISE_LEVELS, class_input(model, labels, p_uncond)), eps)


def ddpm_step(eps_theta, x, i, steps, ddim=False):
    """Step i of `steps` from one noise level down to the next, through NOISE_LEVELS, ..., 0. --solver ddpm
    (the ancestral sampler) draws x at the next level given the digit x1_hat that eps implies, adding noise
    sqrt(beta) z; ddim puts x1_hat and eps back together at the next level."""
    if steps > NOISE_LEVELS:
        raise ValueError(f"a DDPM model has {NOISE_LEVELS} noise levels: use --steps {NOISE_LEVELS} or fewer")
    level, next_level = (round(NOISE_LEVELS * (steps - k) / steps) for k in (i, i + 1))
    a, a_next = alpha_bar(x.device)[level], alpha_bar(x.device)[next_level]
    eps = eps_theta(x, level / NOISE_LEVELS)
    x1_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if ddim:
        return a_next.sqrt() * x1_hat + (1 - a_next).sqrt() * eps
    beta = 1 - a / a_next  # the level's own beta when the next is one lower, as with the default 300 steps
    z = torch.randn(x.shape).to(x.device) if next_level > 0 else 0  # from sample()'s seeded CPU stream
    # the mean of x at the next level given x and x1_hat (the posterior q), plus noise of variance beta
    # (the DDPM paper's first choice; q's own variance, beta (1 - a_next) / (1 - a), is a little smaller)
    return (a_next.sqrt() * beta * x1_hat + (1 - beta).sqrt() * (1 - a_next) * x) / (1 - a) + beta.sqrt() * z


# --- more solvers, and the UNet of any checkpoint ----------------------------


def midpoint_step(field, x, i, steps):
    """Euler's step taken with the slope at its middle: 2 network calls, the error falling as 1/steps^2."""
    dt = 1.0 / steps
    t = i * dt
    return x + dt * field(x + dt / 2 * field(x, t), t + dt / 2)


SOLVERS = {"flow": {"euler": euler_step, "midpoint": midpoint_step},  # the first is the default
           "ddpm": {"ddpm": ddpm_step, "ddim": functools.partial(ddpm_step, ddim=True)}}


def solver_step(model, solver):
    """The step function of --solver, checked against what the model predicts."""
    method = getattr(model, "method", "flow")  # the assignment's UNet is a flow model
    if solver not in SOLVERS[method]:
        raise ValueError(f"a {method} model takes --solver {' or '.join(SOLVERS[method])}, not {solver}")
    return SOLVERS[method][solver]


def build_unet(settings):
    """The UNet that a run's flags describe: vars(args), or the args saved in a checkpoint (older
    ones lack the later flags: those were off)."""
    get = lambda key: settings.get(key, False)
    num_classes = 10 if settings["cond"] == "class" else 0
    if get("sinusoidal_t") or get("time_every_block"):
        model = TimeUNet(settings["hidden"], num_classes, get("sinusoidal_t"), get("time_every_block"))
    else:
        model = UNet(settings["hidden"], num_classes)
    model.method = settings.get("method", "flow")  # what the output is: the velocity, or ddpm's noise
    model.settings = settings
    return model


def load_checkpoint(path, device="cpu"):
    """The UNet saved in a flow.py checkpoint (its EMA weights if it has them), on `device`, in eval mode."""
    ckpt = read_checkpoint(path, device)
    model = build_unet(ckpt["args"])
    try:
        model.load_state_dict(ckpt.get("optimizer", {}).get("ema") or ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"the weights in {path} do not fit the UNet its flags describe") from e
    return to_device(model, device).eval()


# --- autoguidance: guided away from a weaker model, not from the unconditional one ---


class Autoguided(nn.Module):
    """model pushed away from a weaker guide of the same kind (Karras et al. 2024): u_guide + gamma (u -
    u_guide), the guide asked for the same class, 2 network calls a prediction. Sampled at guidance 1."""

    def __init__(self, model, guide, gamma):
        super().__init__()
        self.model, self.guide, self.gamma = model, guide, gamma
        self.num_classes, self.method = model.num_classes, model.method

    def forward(self, x_t, t, c=None):
        u, u_guide = self.model(x_t, t, c).float(), self.guide(x_t, t, c).float()
        return u_guide + self.gamma * (u - u_guide)


def guided(model, guide, guidance):
    """(network, classifier-free guidance) to sample with. Without a guide: (model, guidance). With one,
    autoguidance takes the place of classifier-free guidance: (Autoguided(model, guide, guidance), 1.0)."""
    return (model, guidance) if guide is None else (Autoguided(model, guide, guidance), 1.0)


# --- reflow: straight paths from the model's own pairs (Liu, Gong and Liu 2022) ---
# Lines from independent noise and digits cross, so the learned field's paths curve. Reflow trains again, with
# the same loss, on lines from noise x0 to the teacher's own sample x1 from it: these hardly cross, so the
# student's paths are nearly straight and x1 ~ x0 + u_theta(x0, 0, c). It learns the teacher's guided flow,
# so it samples at gamma 1.
TEACHER = {"solver": "midpoint", "steps": 5, "guidance": 2.0}  # how the teacher draws the pairs


def show_progress(what, done, total, started):
    """A progress line, "what: done/total, eta", on stderr (stdout keeps the tables): rewritten in place,
    wiped when done."""
    line = f"{what}: {done}/{total}, eta {(time.time() - started) / done * (total - done):.0f}s"
    print(line, end="\r" if done < total else "\r" + " " * len(line) + "\r", file=sys.stderr, flush=True)


def make_pairs(teacher, args, per_file=1000, batch_size=100):
    """args.pairs pairs (x1, class, x0): noise x0 and the teacher's digit x1 from it, pair p of digit p % 10.
    Made 1,000 to a file in OUT/pairs and read back from there, so an interrupted run resumes where it
    stopped. x1 is kept as pixels (uint8) like MNIST's images, so that train_epoch reads both alike."""
    folder, device = os.path.join(args.out, "pairs"), next(teacher.parameters()).device
    os.makedirs(folder, exist_ok=True)
    recipe = {"teacher": args.reflow, "seed": args.seed, **TEACHER}  # written into every file of pairs
    files, made, loaded, started = [], 0, 0, time.time()  # made here, and read back from files
    for k in range(math.ceil(args.pairs / per_file)):
        path, first, pairs = os.path.join(folder, f"pairs_{k:03d}.pt"), k * per_file, None
        size = min(per_file, args.pairs - first)
        if os.path.exists(path):
            pairs = torch.load(path, map_location=device, weights_only=True)
            made_with = {key: pairs.get(key) for key in recipe}
            if made_with != recipe:
                raise ValueError(f"{path} holds pairs made with {made_with}, not {recipe}: "
                                 "choose another --out")
        if pairs is None or len(pairs["labels"]) != size:  # missing, or made for another --pairs
            x0, x1, labels = [], [], []
            for j in range(first, first + size, batch_size):  # seeds apart from the ones --evaluate uses
                n, trajectory = min(batch_size, first + size - j), []
                seed = args.seed + 10 ** 6 + j // batch_size
                labels.append(torch.arange(j, j + n, device=device) % 10)
                digits = sample(teacher, n, labels[-1], TEACHER["steps"], TEACHER["guidance"], seed,
                                SOLVERS["flow"][TEACHER["solver"]], trajectory, args.amp)
                x0.append(trajectory[0])  # the noise, on the device like the trajectory
                x1.append(digits.clamp(0, 1).mul(255).round().byte().squeeze(1))
                made += n
                show_progress("pairs made", made, args.pairs - loaded, started)
            pairs = {**recipe, "x0": torch.cat(x0), "x1": torch.cat(x1), "labels": torch.cat(labels)}
            save_checkpoint(path, pairs)
        else:
            loaded += size
        files.append(pairs)
    return [torch.cat([p[key] for p in files]) for key in ("x1", "labels", "x0")]


def step_velocities(trajectory):
    """An Euler trajectory of T steps stacked, (T + 1) x N x 1 x 28 x 28, and the velocity that each step
    took, u_i = (x_{i+1} - x_i) / dt = (x_{i+1} - x_i) T: T x N x 1 x 28 x 28."""
    x = torch.stack(trajectory)
    return x, (x[1:] - x[:-1]) * (len(trajectory) - 1)


def straightness(trajectory):
    """Liu et al.'s S along an Euler trajectory: the mean square of (x_end - x_start) - u_i over the steps'
    velocities u_i: 0 for a straight path."""
    x, u = step_velocities(trajectory)
    return ((x[-1] - x[0]) - u).square().mean().item()


# --- inside the flow: what the network predicts along the way ----------------
# From x_t the velocity points along a straight line that ends, at t = 1, on x1_hat = x_t + (1 - t) u_theta:
# the network's guess of the finished digit (for the exact field at gamma 1, E[x1 | x_t, c]).


def figure(rows, row_labels, col_labels=None, title=None, zoom=3, left=150):
    """Rows of digits (each N x 1 x 28 x 28, all of one length) as one labelled PIL image, the row labels
    in a column `left` pixels wide."""
    strips = [grid_image(row, nrow=len(row), zoom=zoom) for row in rows]
    top = 8 + 22 * (title is not None) + 20 * (col_labels is not None)
    img, draw = canvas(left + strips[0].width + 8, top + sum(s.height for s in strips) + 8)
    if title:
        draw.text((img.width / 2, 6), title, fill="black", anchor="mt")
    for i, label in enumerate(col_labels or []):  # centred over column i
        draw.text((left + (2 + 30 * i + 14) * zoom, top - 4), label, fill="black", anchor="mb")
    for i, (strip, label) in enumerate(zip(strips, row_labels)):
        img.paste(strip, (left, top + i * strip.height))
        draw.text((left - 8, top + (i + 0.5) * strip.height), label, fill="black", anchor="rm")
    return img


def path_figure(x1, seed):
    """Eq. B.3 for each digit of x1 (N x 1 x 28 x 28), one row a digit: x_t at t = 0, 0.1, ..., 1."""
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(0, 1, 11)[:, None, None, None]
    rows = [(1 - t) * x0[k] + t * x1[k] for k in range(len(x1))]
    names, times = [f"test digit {k + 1}" for k in range(len(x1))], [f"t = {v:.1f}" for v in t.flatten()]
    return figure(rows, names, times, "x_t = (1 - t) x0 + t x1 (eq. B.3), what the network is trained on", 2)


def guesses(trajectory):
    """x1_hat = x_t + (1 - t) u at t = 0, 1/T, ..., (T - 1)/T along a trajectory of T Euler steps, with the
    velocity u that each step took: T x N x 1 x 28 x 28."""
    x, u = step_velocities(trajectory)
    t = torch.arange(len(u), device=x.device)[:, None, None, None, None] / len(u)
    return x[:-1] + (1 - t) * u


def predictions_figure(model, args, times=8):
    """Ten Euler samples (class: digits 0 to 9), a row each: x_t beside x1_hat at `times` times from t = 0,
    then the sample. Also, for each time shown, the mean square from x1_hat then to the sample."""
    labels, trajectory = torch.arange(10) if model.num_classes else None, []
    sample(model, 10, labels, args.steps, args.guidance, args.seed, euler_step, trajectory, args.amp)
    x1_hat, x1 = guesses(trajectory), trajectory[-1]
    picks = [round(k * args.steps / times) for k in range(times)]  # the steps shown
    rows = [torch.stack([x[n] for i in picks for x in (trajectory[i], x1_hat[i])] + [x1[n]])
            for n in range(10)]
    names = [f"digit {n}" if labels is not None else f"sample {n + 1}" for n in range(10)]
    columns = [name for i in picks for name in (f"t = {i / args.steps:.3g}", "x1_hat")] + ["sample"]
    title = (f"x_t and the network's guess x1_hat = x_t + (1 - t) u: Euler, {args.steps} steps"
             + (f", gamma {args.guidance:g}" if labels is not None else ""))
    distances = {i / args.steps: (x1_hat[i] - x1).square().mean().item() for i in picks}
    return figure(rows, names, columns, title, zoom=2), distances


@torch.inference_mode()
def guesses_from_noise(model, args, device, n=1000):
    """A table: the guess at t = 0, x1_hat = x0 + u(x0, 0, c), of n noises (n/10 for each digit c), against
    the exact field's: the class's mean training digit m_c (guided: m + gamma (m_c - m)), or the mean image
    m for c = 0 and time-only models. Mean squares per draw, and of the average draw of each digit."""
    images, train_labels = load_mnist(args.data, device)
    x = to_float(images)
    m = x.mean(0)  # the mean training image, 1 x 28 x 28
    m_c = torch.stack([x[train_labels == k].mean(0) for k in range(10)])  # each class's, 10 x 1 x 28 x 28
    labels = torch.arange(n, device=device) % 10
    x0 = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)
    print(f"the guess at t = 0 of {n} noises, mean squares\n| guess | against | per draw | average draw |\n|"
          + " --- |" * 2 + " ---: |" * 2)

    def row(name, against, guess, target, draws=True):  # draws: averaged over each digit's draws too
        error, average = guess - target, "-"
        if draws:
            average = torch.stack([error[labels == k].mean(0).square().mean() for k in range(10)])
            average = f"{average.mean().item():.4f}"
        print(f"| {name} | {against} | {error.square().mean().item():.4f} | {average} |")

    model.eval()
    if model.num_classes:
        c, gamma = F.one_hot(labels, 10).float(), args.guidance
        row(f"c = digit, gamma {gamma:g}", "m_c" if gamma == 1 else "m + gamma (m_c - m)",
            x0 + model_output(model, x0, 0.0, c, gamma), m + gamma * (m_c[labels] - m))
        row("c = 0", "m", x0 + model_output(model, x0, 0.0, 0 * c), m.expand_as(x0))
        j, k = torch.tensor([(j, k) for j in range(10) for k in range(10) if j != k], device=device).T
        row("reference: a training digit", "m_c", x, m_c[train_labels], draws=False)
        row("reference: another digit's mean", "m_c", m_c[j], m_c[k], draws=False)
    else:
        row("time-only", "m", x0 + model_output(model, x0, 0.0), m.expand_as(x0))
        row("reference: a training digit", "m", x, m.expand_as(x), draws=False)
        row("reference: a digit's mean", "m", m_c, m.expand_as(m_c), draws=False)


def inside_the_flow(model, args, device, out):
    """--predictions: path.png and predictions.png in out, and the guesses' numbers."""
    if model.method != "flow" or args.solver != "euler" or args.steps < 8:
        raise ValueError("--predictions reads the velocity off Euler steps: it takes a flow model, "
                         "--solver euler and --steps 8 or more")
    test_digits = to_float(load_mnist(args.data, "cpu", 4, train=False)[0])
    path_figure(test_digits, args.seed).save(os.path.join(out, "path.png"))
    img, distances = predictions_figure(model, args)
    img.save(os.path.join(out, "predictions.png"))
    print("mean square from x1_hat to the sample:", *(f"t {t:.3g}: {d:.4f}" for t, d in distances.items()))
    guesses_from_noise(model, args, device)
    print(f"wrote {os.path.join(out, 'path.png')} and {os.path.join(out, 'predictions.png')}")


# --- sample quality, measured: a small MNIST classifier's verdict on the samples ---


def make_classifier():
    """A small CNN for digits; all but its last layer give the 128 features the FD compares."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14 x 14
                         nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7 x 7
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "mnist_classifier.pt")


def load_classifier(root, device, epochs=3, batch_size=128):
    """The classifier shipped in samples/, so that every machine scores alike; without it (this file
    copied out alone), the one cached in root, trained there at first use (seed 0, Adam 1e-3 decayed to 0)."""
    cached = os.path.join(root, "mnist_classifier.pt")
    for path in (CLASSIFIER, cached):
        saved = torch.load(path, map_location=device, weights_only=True) if os.path.exists(path) else {}
        if "accuracy" in saved:  # weights in fp16, and its accuracy on the test split
            classifier = make_classifier().to(device)
            classifier.load_state_dict(saved["model"])
            print(f"classifier {path}: test accuracy {saved['accuracy']:.4f}", file=sys.stderr)
            return classifier.eval()
    print(f"no classifier in {CLASSIFIER} or {cached}: training one into {cached}", file=sys.stderr)
    torch.manual_seed(0)
    classifier = make_classifier().to(device)
    (x_all, y_all), (x_test, y_test) = load_mnist(root, device), load_mnist(root, device, train=False)
    started, batches = time.time(), len(x_all) // batch_size
    optimizer = torch.optim.Adam(classifier.train().parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, epochs * batches)  # linearly down to 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), device=device)
        for step in range(batches):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(classifier(to_float(x_all[idx])), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if (step + 1) % 100 == 0 or step + 1 == batches:
                show_progress("classifier steps", epoch * batches + step + 1, epochs * batches, started)
    accuracy = classify(classifier.eval(), to_float(x_test), y_test)[0]
    print(f"classifier {cached}: test accuracy {accuracy:.4f}", file=sys.stderr)
    if accuracy < 0.99:
        raise ValueError(f"the classifier reached only {accuracy:.4f} test accuracy, too little to judge by")
    torch.save({"model": classifier.half().state_dict(), "accuracy": accuracy}, cached)  # as the shipped one
    return classifier.float().eval()  # rounded to fp16, as it will be read back


@torch.inference_mode()
def classify(classifier, x, labels=None, batch_size=1000):
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
    """Frechet distance of Gaussians fitted to feature sets a and b (N x d), in float64 on the CPU:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    def sqrtm(m):  # of a symmetric positive semi-definite matrix, by its eigendecomposition
        w, v = torch.linalg.eigh(m)
        return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T

    a, b = a.cpu().double(), b.cpu().double()  # MPS has no float64
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = sqrtm(s_a)
    return ((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace()
            - 2 * sqrtm(root @ s_b @ root).trace()).item()


def yardstick(args, device, n):
    """A verdict on n digits, as the cells of a table row: accuracy (with labels) or entropy, confidence,
    the FD to the classifier's features of the 10,000 test digits, and beside it "real", the FD of n real
    train digits: what real digits score at this n (the FD shrinks as n grows)."""
    classifier = load_classifier(args.data, device)
    digits = lambda limit, train: to_float(load_mnist(args.data, device, limit, train)[0])
    test_features = classify(classifier, digits(None, False))[2]
    real_fd = frechet_distance(classify(classifier, digits(n, True))[2], test_features)

    def verdict(x, labels=None):
        value, confidence, features = classify(classifier, x, labels)
        fd = frechet_distance(features, test_features)
        return f"{value:.4f} | {confidence:.4f} | {fd:.2f} | {real_fd:.2f}"
    return verdict


def evaluate(model, args, device, sweep, guide=None, batch_size=100):
    """Score args.evaluate samples: a table row for each solver, steps and guidance of the sweep; Euler
    rows also give the straightness of their paths."""
    n = args.evaluate
    verdict = yardstick(args, device, n)
    labels = torch.arange(n, device=device) % 10 if model.num_classes else None  # n/10 of each digit
    measure = "accuracy" if model.num_classes else "entropy"
    print(f"{n} samples, seed {args.seed}; FD to the 10,000 test digits; real: FD of {n} real train digits\n"
          f"| solver | steps | NFE | guidance | {measure} | confidence | FD | real | straightness | s |\n|"
          + " ---: |" * 10)
    guidances = sweep["guidance"] if model.num_classes or guide else ["-"]
    for solver, steps, guidance in itertools.product(sweep["solver"], sweep["steps"], guidances):
        net, net_guidance = guided(model, guide, guidance if guidance != "-" else 1.0)
        started, xs, bends = time.time(), [], []
        for i in range(0, n, batch_size):  # in batches: CPUs run them faster
            trajectory = [] if solver == "euler" else None
            asked = None if labels is None else labels[i:i + batch_size]  # the digits of this batch
            xs.append(sample(net, min(batch_size, n - i), asked, steps, net_guidance, args.seed + i,
                             solver_step(model, solver), trajectory, args.amp))
            if trajectory is not None:
                bends.append(straightness(trajectory) * len(xs[-1]) / n)
            show_progress(f"{solver}, {steps} steps, samples", i + len(xs[-1]), n, started)
        # network calls a sample: guidance's two halves go in one batch, one call; a guide is another network
        nfe = steps * (2 if solver == "midpoint" else 1) * (2 if guide else 1)
        bent = f"{sum(bends):.4f}" if bends else "-"
        print(f"| {solver} | {steps} | {nfe} | {guidance} | {verdict(torch.cat(xs).clamp(0, 1), labels)} | "
              f"{bent} | {time.time() - started:.0f} |", flush=True)


# --- scoring anyone's samples: a learner's own implementation on the same yardstick ---


def read_samples(path):
    """The digits (N x 1 x 28 x 28, clamped to [0, 1]) and labels (N digits, or None) that any code saved with
    torch.save: a tensor, or a dict of "images" and "labels". Else a ValueError that says what is off."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception as e:
        raise ValueError(f"{path} is not a file of tensors from torch.save ({type(e).__name__})") from e
    images, labels = (data.get("images"), data.get("labels")) if isinstance(data, dict) else (data, None)
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1:] != (1, 28, 28) or len(images) < 2:
        held = " x ".join(map(str, images.shape)) if torch.is_tensor(images) else type(images).__name__
        held = "a dict without 'images'" if isinstance(data, dict) and images is None else held
        raise ValueError(f"{path} holds {held}, not N x 1 x 28 x 28 digits, N >= 2 (alone, or as 'images')")
    x = images.float()
    background, low, high = x.median().item(), x.min().item(), x.max().item()  # MNIST's background is 0
    # each convention by its fingerprint; anything else is scored, a broken sampler's noise included
    if high > 10 and low > -1:
        raise ValueError(f"{path} has pixels up to {high:.0f}, as if in 0-255: divide them by 255")
    if background < -0.9 and high < 1.5:
        raise ValueError(f"{path} has a background of {background:.2f}, as if in [-1, 1]: "
                         "map x to (x + 1) / 2")
    if -0.5 < background < -0.35 and 2 < high < 3.5:
        raise ValueError(f"{path} has a background of {background:.2f}, as if normalised by MNIST's mean and "
                         "std: map x to x * 0.3081 + 0.1307")
    if background > 0.9 and high < 1.5:
        raise ValueError(f"{path} has a background of {background:.2f}, as if black digits on white: "
                         "map x to 1 - x")
    whole = torch.is_tensor(labels) and labels.shape == (len(x),) and not labels.is_floating_point()
    if labels is not None and not (whole and 0 <= labels.min() <= labels.max() <= 9):
        raise ValueError(f"the labels in {path} should be {len(x)} whole numbers from 0 to 9")
    return x.clamp(0, 1), labels  # samplers do not clamp: --evaluate clamps this repo's own


def score_file(args, device):
    """--score: --evaluate's verdict on the digits in args.score, which any code made."""
    x, labels = read_samples(args.score)
    n, warn = len(x), lambda text: print(f"flow.py: warning: {text}", file=sys.stderr)
    if n < 1000:
        warn(f"{n} digits: the FD grows as N shrinks, so compare FDs at equal N, 1,000 or more")
    counts = None if labels is None else torch.bincount(labels, minlength=10)
    if counts is not None and counts.max() - counts.min() > max(1, n // 100):
        warn(f"the labels are unbalanced ({counts.tolist()}); --evaluate draws N/10 of each digit")
    verdict = yardstick(args, device, n)
    measure = "entropy" if labels is None else "accuracy"
    print(f"{n} digits from {args.score}; FD to the 10,000 test digits; real: FD of {n} real train digits\n"
          f"| {measure} | confidence | FD | real |\n|" + " ---: |" * 4)
    print(f"| {verdict(x.to(device), None if labels is None else labels.to(device))} |")


# --- the flow as a density: bits/dim of test digits ---------------------------
# The ODE carries each noise x0 to one image x1, so any image x1 came from the x0 found by running the ODE
# backward from t = 1 to 0. Along the way the density changes as the field spreads or gathers points:
# d log p_t(x_t) / dt = -div u(x_t, t), the divergence being the trace of du/dx. So log p1(x1) =
# log N(x0; 0, I) - integral_0^1 div u(x_t, t) dt (Chen et al. 2018; FFJORD, Grathwohl et al. 2019).

def dequantized(loss_fn):
    """loss_fn on digits (pixel + jitter) / 256, jitter ~ U[0, 1) drawn afresh for every pixel of every
    batch (Theis et al. 2016). On the 256 levels alone a density can grow without bound (bits/dim to minus
    infinity); spread over each level's bin, its bits/dim bound the code length of the 8-bit digits."""
    def loss(model, x1, *rest):
        return loss_fn(model, ((x1 * 255).round() + torch.rand_like(x1)) / 256, *rest)
    return loss


def divergence(model, x, t, c=None, probe=None):
    """The velocity u(x, t, c) and its divergence, the trace of du/dx, for each image of x: Hutchinson's
    estimate e^T (du/dx) e for a probe e of random signs, one vector-Jacobian product (unbiased: E[e e^T]
    = I), or, without a probe, the exact trace, one product per pixel (784)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = model_output(model, x, t, c)
        probes = [probe]
        if probe is None:  # one-hot images: each pixel in turn, in every image at once
            probes = [e.view(x[0].shape).expand_as(x) for e in torch.eye(x[0].numel(), device=x.device)]
        div = sum((torch.autograd.grad(u, x, e, retain_graph=True)[0] * e).flatten(1).sum(1) for e in probes)
    return u.detach(), div


def log_likelihood(model, x1, steps, solver="midpoint", c=None, probe=None, power=2):
    """base, integral and x0 of log p1(x1) = base - integral for each image: x and the divergence's integral
    run backward from t = 1 to 0 in `steps` steps of `solver` at t_k = 1 - (k/steps)^power, packed near t = 1,
    where the field changes fastest; base = log N(x0; 0, I) at the end. One probe per image serves every
    step, as in FFJORD (fresh ones would be unbiased too)."""
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics: each image's density its own
    times = [1 - (k / steps) ** power for k in range(steps + 1)]
    x, integral = x1, torch.zeros(len(x1), device=x1.device)
    for t, s in zip(times, times[1:]):
        h = t - s  # a step back in time
        if solver == "midpoint":  # the slope and the divergence at the step's middle
            with torch.no_grad():
                half = x - h / 2 * model_output(model, x, t, c)
            u, div = divergence(model, half, t - h / 2, c, probe)
        else:
            u, div = divergence(model, x, t, c, probe)
        x, integral = x - h * u, integral + h * div
    model.train(was_training)
    base = -0.5 * x.flatten(1).square().sum(1) - 0.5 * x[0].numel() * math.log(2 * math.pi)
    return base, integral, x


def bits_per_dim(log_p, dims=784):
    """-log2 p1(x) per pixel, plus 8 for the width 1/256 of a pixel's bin: a uniform density on
    [0, 1]^784 (log p = 0) scores 8, as a code of 8 bits a pixel would."""
    return -log_p / (dims * math.log(2)) + 8


def likelihood(model, args, device, batch_size=100):
    """--likelihood: bits/dim of the first N test digits, (pixel + jitter) / 256 with the jitter and the
    probes drawn from the seed; a class model's density both by its c = 0 half and as p(x | c)."""
    n = args.likelihood
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32, not TF32
    if model.method != "flow":
        raise ValueError(f"--likelihood needs a flow model: {args.ckpt} is a {model.method} model")
    solver_step(model, args.solver)  # euler or midpoint, checked as for sampling
    if n > 10000:
        raise ValueError(f"--likelihood {n}: the test split has 10,000 digits")
    if not model.settings.get("dequantize"):
        print(f"flow.py: warning: {args.ckpt} was trained on pixel / 255, not --dequantize: its density sits "
              "on 256 levels, and dequantized digits lie off them", file=sys.stderr)
    images, labels = load_mnist(args.data, device, n, train=False)
    generator = torch.Generator().manual_seed(args.seed)  # the same jitter and probes on any device
    jitter = torch.rand(n, 1, 28, 28, generator=generator)
    probes = (torch.randint(0, 2, jitter.shape, generator=generator) * 2 - 1).float().to(device)
    x1 = (images.unsqueeze(1).float() + jitter.to(device)) / 256
    densities = {"p(x)": None}
    if model.num_classes:
        one_hot = F.one_hot(labels, 10).float()
        densities = {"p(x), c = 0": 0 * one_hot, "p(x given c), c = its digit": one_hot}
    nfe = args.steps * (2 if args.solver == "midpoint" else 1)
    print(f"{n} dequantized test digits, seed {args.seed}; {args.solver}, {args.steps} steps, NFE {nfe}\n"
          "| density | bits/dim | standard error | -log2 N(x0) / 784 | integral of div / (784 ln 2) | "
          "std of x0 | s |\n|" + " ---: |" * 7)
    for name, c in densities.items():
        started, terms = time.time(), []
        for i in range(0, n, batch_size):
            part = slice(i, i + batch_size)
            base, integral, x0 = log_likelihood(model, x1[part], args.steps, args.solver,
                                                None if c is None else c[part], probes[part])
            terms.append(torch.stack([base, integral, x0.flatten(1).std(1)], 1).cpu())
            show_progress(f"{name}, test digits", i + len(base), n, started)
        base, integral, spread = torch.cat(terms).T
        bits, dims_ln2 = bits_per_dim(base - integral), 784 * math.log(2)  # nats / (784 ln 2): bits/dim
        error = f"{bits.std().item() / math.sqrt(n):.4f}" if n > 1 else "-"
        print(f"| {name} | {bits.mean():.4f} | {error} | {-base.mean() / dims_ln2:.4f} | "
              f"{integral.mean() / dims_ln2:.4f} | {spread.mean():.3f} | {time.time() - started:.0f} |",
              flush=True)


# --- sweeps and sampling from a checkpoint -----------------------------------


def sweep_figure(model, args, sweep, guide=None):
    """One row of ten digits (class: 0 to 9) for each solver, steps and guidance of the sweep, all from
    the same starting noise, so that rows differ only by those settings."""
    labels, rows, names = torch.arange(10) if model.num_classes else None, [], []
    for solver, steps, guidance in itertools.product(*sweep.values()):
        net, net_guidance = guided(model, guide, guidance)
        rows.append(sample(net, 10, labels, steps, net_guidance, args.seed, solver_step(model, solver),
                           amp=args.amp))
        guided_by = f", gamma {guidance}" if labels is not None or guide else ""
        names.append(f"{solver}, steps {steps}{guided_by}")
    return figure(rows, names, zoom=2, left=210)


def from_checkpoint(args, device, sweep):
    """The modes that need no training: --evaluate, --likelihood, --predictions and --sample-only."""
    args.ckpt = args.ckpt or os.path.join(args.out or default_out(args), "ckpt.pt")
    model = load_checkpoint(args.ckpt, device)
    args.method, args.cond = model.method, "class" if model.num_classes else "time"
    args.reflow = model.settings.get("reflow")
    guide = load_checkpoint(args.autoguide, device) if args.autoguide else None
    if guide and (guide.method, guide.num_classes) != (model.method, model.num_classes):
        raise ValueError(f"--autoguide needs a {model.method} {args.cond} model, as --ckpt is: "
                         f"{args.autoguide} is not one")
    if sweep["guidance"] and not (model.num_classes or guide):
        raise ValueError(f"{args.ckpt} is time-only, with no class to guide by: --guidance needs --autoguide")
    sampling_defaults(args, sweep)
    if args.compile:
        model.compile()
    if args.evaluate:
        return evaluate(model, args, device, sweep, guide)
    if args.likelihood:
        return likelihood(model, args, device)
    out = args.out or default_out(args)
    writable(out)
    if args.predictions:
        return inside_the_flow(model, args, device, out)
    started, trajectory = time.time(), [] if args.gif else None
    varied = [name for name, values in sweep.items() if len(values) > 1]
    if varied:  # sweep_steps.png, sweep_solver_steps.png, ...: the name says which settings vary
        path = os.path.join(out, "_".join(["sweep"] + varied) + ".png")
        sweep_figure(model, args, sweep, guide).save(path)
    else:
        path = os.path.join(out, "samples.png")
        net, net_guidance = guided(model, guide, args.guidance)
        grid_args = argparse.Namespace(**{**vars(args), "guidance": net_guidance})  # what sample_grid reads
        sample_grid(net, grid_args, trajectory, solver_step(model, args.solver)).save(path)
    if trajectory:
        save_gif(os.path.join(out, "sampling.gif"), trajectory)
    print(f"wrote {path} in {time.time() - started:.1f}s")


# --- speed: a benchmark of the real code path, and torch.compile -------------


def benchmark(model, data, args, loss_fn, step_fn, batches=30):
    """Training images/s over `batches` steps and the seconds one sample grid takes (each the second of two
    runs), through the same functions a real run uses."""
    args.log_every, args.epochs = 10 ** 9, 1  # no log lines; train_epoch's ETA counts one epoch
    n = min(len(data[0]), batches * args.batch_size)  # the images of `batches` steps
    optimizer, device = torch.optim.Adam(model.parameters(), lr=args.lr), data[0].device

    def timed(work):  # seconds, the second of two runs: the first pays for warm-up and kernel autotuning
        for _ in range(2):
            started = time.time()
            work()
            if device.type != "cpu":
                getattr(torch, device.type).synchronize()  # wait for the GPU's queue to empty
        return time.time() - started

    train_speed = n // args.batch_size * args.batch_size / timed(
        lambda: train_epoch(model, optimizer, [d[:n] for d in data], 1, args, loss_fn))
    grid_seconds = timed(lambda: sample_grid(model, args, step_fn=step_fn))
    name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    name += f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"benchmark on {name}: training {train_speed:.0f} images/s (batch {args.batch_size}); "
          f"{grid_seconds:.2f} s per 40-digit grid ({args.solver}, {args.steps} steps)")



# --- main: the assignment's flags and the others; a run with the assignment's alone is its run() ---

# the flags beyond the assignment that shape training: a resumed run takes them from its checkpoint too
TRAINING_FLAGS += ["sinusoidal_t", "time_every_block", "logit_normal_t", "ema", "dequantize", "method",
                   "reflow", "pairs"]


def train_beyond(args, device):
    """The assignment's train() with what the other flags add: on MNIST, or with --reflow on a teacher's
    pairs."""
    teacher = load_checkpoint(args.reflow, device) if args.reflow else None
    if teacher and (teacher.method, teacher.num_classes) != ("flow", 10):
        kind = f"{teacher.method} model, {'class' if teacher.num_classes else 'time'}-conditioned"
        raise ValueError(f"--reflow needs a class-conditioned flow model: {args.reflow} is a {kind}")
    args.out = args.out or default_out(args)
    if not args.benchmark:
        prepare_out(args)
    if teacher:
        model, data = copy.deepcopy(teacher).train(), make_pairs(teacher, args)
    else:
        model = to_device(build_unet(vars(args)), device)
        data = load_mnist(args.data, device, args.limit)
    loss_fn = logit_normal_loss if args.logit_normal_t else flow_matching_loss
    loss_fn = ddpm_loss if args.method == "ddpm" else loss_fn
    loss_fn = dequantized(loss_fn) if args.dequantize else loss_fn
    step_fn = solver_step(model, args.solver)
    if args.compile:
        model.compile()  # fuses BatchNorm, GELU and the rest; the first steps are slow while it compiles
    if args.benchmark:
        return benchmark(model, data, args, loss_fn, step_fn)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = keep_ema(optimizer, model, data, loss_fn, args) if args.ema else None  # sampled instead of model
    train(args, model, optimizer, data, loss_fn, step_fn, ema)


def default_out(args):
    """A resumed run's own folder, or runs/<method>_<cond>[_reflow] (runs/ is ignored by git; samples/
    holds only the results the README shows)."""
    if args.resume:
        return os.path.dirname(args.resume)
    return os.path.join("runs", f"{args.method}_{args.cond}" + ("_reflow" if args.reflow else ""))


def sampling_defaults(args, sweep):
    """Fill in the sweep's lists not given with the defaults --help states, and set args to their first
    values."""
    solver = "midpoint" if args.likelihood else list(SOLVERS[args.method])[0]
    time_flow = (args.method, args.cond) == ("flow", "time")
    steps = 1 if args.reflow else 50 if time_flow else 300
    steps = 40 if args.predictions else 120 if args.likelihood else steps
    unguided = args.reflow or args.predictions or args.likelihood
    sweep["solver"] = sweep["solver"] or [solver]
    sweep["steps"] = sweep["steps"] or [steps]
    sweep["guidance"] = sweep["guidance"] or [1.0 if unguided else 5.0]
    args.solver, args.steps, args.guidance = (values[0] for values in sweep.values())


def main(argv=None):
    parser = assignment_parser()  # the assignment's flags, then the groups beyond it
    parser.epilog = "--sample-only and --evaluate sweep comma-separated --solver, --steps and --guidance."
    parser.conflict_handler = "resolve"  # the sweeps' --steps and --guidance, lists, replace the plain ones
    add = parser.add_argument_group("beyond the assignment: training", "--method ddpm's defaults: --epochs "
                                    "20 --batch-size 128 --lr 0.001 --sample-epochs 1,5,10,20;\n--reflow's: "
                                    "--lr 0.001").add_argument
    add("--sinusoidal-t", action="store_true", help="feed sin and cos of t at 16 frequencies (default: off)")
    add("--time-every-block", action="store_true", help="t scales and shifts every block (default: off)")
    add("--logit-normal-t", action="store_true", help="train on t = sigmoid(N(0, 1)) (default: off)")
    add("--ema", type=float, default=0, metavar="DECAY", help="sample from an EMA, e.g. 0.999 (default: off)")
    add("--dequantize", action="store_true", help="train on (pixel + U[0, 1)) / 256, for --likelihood "
        "(default: off)")
    add("--method", choices=["flow", "ddpm"], default="flow", help="flow matching or DDPM (default: flow)")
    add("--reflow", metavar="CKPT", help="fine-tune this class flow model on pairs it draws (default: off)")
    add("--pairs", type=positive(int), default=60000, metavar="N", help="reflow pairs (default: %(default)s)")
    add("--compile", action="store_true", help="torch.compile the UNet; slow to start (default: off)")
    group = parser.add_argument_group("beyond the assignment: sampling, scoring, no training")
    add = group.add_argument
    add("--steps", type=number_list(positive(int)), metavar="N",
        help="sampling steps (default: 50; class, ddpm 300; reflow 1; --predictions 40, --likelihood 120)")
    add("--guidance", type=number_list(float), metavar="G",
        help="Alg. B.4 gamma; with --autoguide, autoguidance's (default: 5; reflow, --predictions, "
        "--likelihood 1)")
    add("--solver", type=number_list(str), help="euler or midpoint; ddpm: ddpm or ddim (default: the first; "
        "--likelihood midpoint)")
    add("--autoguide", metavar="CKPT", help="guide away from this weaker model, by --guidance (default: off)")
    add("--ckpt", help="checkpoint (or model.pt) to sample or score (default: OUT/ckpt.pt)")
    add = group.add_mutually_exclusive_group().add_argument  # one mode at a time
    add("--sample-only", action="store_true", help="no training: a grid from --ckpt (default: off)")
    add("--evaluate", type=positive(int), metavar="N", help="no training: score N samples (default: off)")
    add("--likelihood", type=positive(int), metavar="N",
        help="no training: bits/dim of N test digits under --ckpt's flow, in fp32 (default: off)")
    add("--predictions", action="store_true",
        help="no training: path.png, and predictions.png of --ckpt: x_t beside x1_hat (default: off)")
    add("--score", metavar="FILE", help="no training: score the digits any code saved to FILE (default: off)")
    add("--benchmark", action="store_true",
        help="time 30 training steps and a grid, each after a warm-up run, exit (default: off)")
    first = parser.parse_args(argv)  # which defaults apply: the DDPM version's, or reflow's fine-tuning rate
    if first.method == "ddpm":
        parser.set_defaults(epochs=20, batch_size=128, lr=1e-3, sample_epochs="1,5,10,20")
    if first.reflow:
        parser.set_defaults(lr=1e-3)
    args, device = parse(parser, argv)
    if args.logit_normal_t and args.method == "ddpm":
        parser.error("--logit-normal-t is for flow matching: DDPM draws noise levels from 1..300")
    no_training = args.sample_only or args.evaluate or args.predictions or args.likelihood
    solvers = [*SOLVERS["flow"], *SOLVERS["ddpm"]] if no_training else list(SOLVERS[args.method])
    if set(args.solver or []) - set(solvers):
        parser.error(f"--solver takes {' or '.join(solvers)}, got {','.join(args.solver)}")
    sweep = {"solver": args.solver, "steps": args.steps, "guidance": args.guidance}  # lists, or None
    swept = any(len(values or []) > 1 for values in sweep.values())
    if swept and not no_training:
        parser.error("lists of --solver, --steps or --guidance are for --sample-only and --evaluate")
    if args.autoguide and not no_training:
        parser.error("--autoguide is for --sample-only and --evaluate")
    if args.reflow and (no_training or args.method == "ddpm" or args.limit or args.benchmark):
        parser.error("--reflow trains a flow model on --pairs pairs: not with --method ddpm, --limit, "
                     "--benchmark or a no-training mode")
    if args.reflow and args.pairs < args.batch_size:
        parser.error(f"--pairs {args.pairs} is less than --batch-size {args.batch_size}: raise --pairs")
    if args.gif and (swept or args.evaluate or args.predictions or args.likelihood or args.score):
        parser.error("--gif animates one grid: not with --evaluate, --likelihood, --predictions, --score "
                     "or lists")
    if args.likelihood and (swept or args.autoguide or (args.guidance or [1]) != [1]):
        parser.error("--likelihood is the density of the unguided field: not with --autoguide, "
                     "a --guidance other than 1 or lists of settings")
    if args.predictions and (swept or args.autoguide):
        parser.error("--predictions draws one figure: not with --autoguide or lists of settings")
    if args.reflow:  # the student starts as its teacher, so its UNet's flags are the teacher's
        try:
            unet = ["cond", "hidden", "sinusoidal_t", "time_every_block"]
            take_flags(parser, argv, args, args.reflow, unet, "for --reflow")
        except ValueError as e:
            parser.error(str(e))
    assignment_flags = vars(assignment_parser().parse_args([]))
    plain = all(value == parser.get_default(key)  # every flag beyond the assignment at its default
                for key, value in vars(args).items() if key not in assignment_flags)
    try:
        if args.score:
            return score_file(args, device)
        if no_training:
            return from_checkpoint(args, device, sweep)
        sampling_defaults(args, sweep)
        if plain:
            return run(args, device)  # the assignment, as its code runs alone
        train_beyond(args, device)
    except ValueError as e:
        sys.exit(f"flow.py: error: {e}")


if __name__ == "__main__":
    main()
