"""
One-step denoising on MNIST, the warm-up before flow matching (part 1 of the assignment).

A UNet D_theta maps a noisy digit z = x + sigma eps (eq. B.2) back to the clean digit x, trained
by L2 regression (eq. B.1). Trained at sigma = 0.5 it removes that noise well, and less well at
noise levels it never saw. Asked to turn pure noise z = eps into a digit (--pure-noise), it
can only answer with the average training image: z carries no information about x, and the
prediction that minimises the expected squared error is then E[x]. Generating digits needs
many small steps instead, which is what flow.py does.

    python denoise.py                   # 5 epochs at sigma 0.5 -> runs/denoise: every Part 1 figure
    python denoise.py --pure-noise      # -> runs/denoise_pure_noise: outputs beside the mean image
    python denoise.py --epochs 1 --limit 4096   # a quick check on a CPU

Writes noising.png, denoised_epochNN.png, ood.png (with --pure-noise: pure_noise_epochNN.png and
mean_image.png), loss.csv, loss.png, metrics.csv and ckpt.pt to --out, the figures after the first
and the last epoch. 154 min on a 2-core CPU in fp32, 85 min with --amp (bfloat16).
"""
import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

SCRIPT = "denoise.py"  # written into every checkpoint; read_checkpoint accepts only its own
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]  # the noise levels of the figures (eq. B.2)

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


# --- the unconditional UNet --------------------------------------------------


class UNet(nn.Module):
    """D_theta(z): a noisy 1 x 28 x 28 digit in, a clean one out."""

    def __init__(self, hidden=128):
        super().__init__()
        D = hidden
        self.conv_in = ConvBlock(1, D)
        self.down1 = DownBlock(D, D)
        self.down2 = DownBlock(D, 2 * D)
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())  # 2D x 7 x 7 -> 2D x 1 x 1
        self.unflatten = bn_gelu(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7, 0))  # back to 7 x 7
        self.up1 = UpBlock(4 * D, D)
        self.up2 = UpBlock(2 * D, D)
        self.conv_out = nn.Sequential(ConvBlock(2 * D, D), nn.Conv2d(D, 1, 3, 1, 1))

    def forward(self, z):
        e0 = self.conv_in(z)  # D x 28 x 28
        e1 = self.down1(e0)  # D x 14 x 14
        e2 = self.down2(e1)  # 2D x 7 x 7
        mid = self.unflatten(self.flatten(e2))  # 2D x 7 x 7
        h1 = self.up1(torch.cat([e2, mid], 1))  # D x 14 x 14
        h2 = self.up2(torch.cat([e1, h1], 1))  # D x 28 x 28
        return self.conv_out(torch.cat([e0, h2], 1))  # 1 x 28 x 28


# --- data, noising, the loss (eq. B.1) and evaluation -------------------------


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


def add_noise(x, sigma, pure_noise=False, generator=None):
    """z = x + sigma eps (eq. B.2), or the blank canvas z = eps when pure_noise. eps comes from a CPU
    generator where one is given (the same figures on every device), else from x's device."""
    eps = torch.randn_like(x) if generator is None else torch.randn(x.shape, generator=generator).to(x.device)
    return eps if pure_noise else x + sigma * eps


def denoising_loss(model, x, sigma, pure_noise=False):
    """The L2 loss of eq. B.1 on fresh noise: every epoch sees new noisy versions of each digit."""
    return F.mse_loss(model(add_noise(x, sigma, pure_noise)), x)


def to_float(images):
    return images.unsqueeze(1).float() / 255  # N x 28 x 28 uint8 -> N x 1 x 28 x 28 in [0, 1]


@torch.inference_mode()
def evaluate(model, images, sigma, pure_noise=False, amp=False, batch_size=500, seed=0):
    """Mean squared error per pixel of D(z) against the clean images, and the mean output, with the
    noise fixed by seed so that epochs compare. BatchNorm uses its running statistics."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    x = to_float(images)
    with autocast(x.device, amp):
        out = torch.cat([model(add_noise(b, sigma, pure_noise, generator)) for b in x.split(batch_size)])
    return F.mse_loss(out.float(), x).item(), out.float().mean(0)


def psnr(mse):
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")  # pixels in [0, 1]


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


def train_epoch(model, optimizer, x_all, epoch, args):
    """One pass over the training images in a fresh random order; returns the per-step losses."""
    model.train()
    batches = len(x_all) // args.batch_size  # the last partial batch is dropped
    perm = torch.randperm(len(x_all), device=x_all.device)
    losses, started = torch.zeros(batches, device=x_all.device), time.time()  # read back at log steps only
    for step in range(batches):
        x = to_float(x_all[perm[step * args.batch_size:(step + 1) * args.batch_size]])
        with autocast(x.device, args.amp):
            loss = denoising_loss(model, x, args.sigma, args.pure_noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if (step + 1) % args.log_every == 0 or step + 1 == batches:
            seen = losses[:step + 1].tolist()  # the one sync of a log step
            if not all(map(math.isfinite, seen)):
                first = next(i for i, v in enumerate(seen) if not math.isfinite(v))
                kept = "no checkpoint exists yet" if epoch == 1 else f"epoch {epoch - 1}'s checkpoint is kept"
                raise ValueError(f"the loss became {seen[first]} at step {first + 1} of epoch {epoch}; "
                                 f"{kept}; try a lower --lr")
            seconds = time.time() - started
            eta = seconds / (step + 1) * ((args.epochs - epoch + 1) * batches - step - 1)
            print(f"epoch {epoch}/{args.epochs} | step {step + 1:4d}/{batches} | loss {seen[-1]:.4f} | "
                  f"{(step + 1) * args.batch_size / seconds:4.0f} img/s | eta {eta / 60:.1f} min", flush=True)
    return losses.tolist()


def train(args, device):
    model = to_device(UNet(args.hidden), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, metrics, start_epoch = [], [], 1
    if args.resume:  # the weights, the optimizer and the random stream, as they were
        ckpt = read_checkpoint(args.resume, device)
        for key in ("hidden", "batch_size", "epochs", "limit", "sigma", "pure_noise"):
            old, new, flag = ckpt["args"][key], getattr(args, key), "--" + key.replace("_", "-")
            if old != new:
                raise ValueError(f"{args.resume} was trained with {flag} {old}, not {new}: "
                                 f"pass {flag} {old} to resume it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_random_streams(ckpt, device)
        losses, metrics, start_epoch = ckpt["losses"], ckpt["metrics"], ckpt["epoch"] + 1
    x_all, x_test = (load_mnist(args.data, device, args.limit, train)[0] for train in (True, False))
    if len(x_all) < args.batch_size:
        raise ValueError(f"--limit {len(x_all)} is less than --batch-size {args.batch_size}: raise --limit")
    shown = to_float(x_test[:8])  # the test digits in every figure
    mean_image = to_float(x_all).mean(0)  # 1 x 28 x 28, the MSE-optimal answer to pure noise
    batches = len(x_all) // args.batch_size
    print(f"{len(x_all):,} train and {len(x_test):,} test images, {batches} steps per epoch, device {device}")
    if not args.pure_noise:
        sigma_figure(shown[:4]).save(os.path.join(args.out, "noising.png"))

    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        losses += train_epoch(model, optimizer, x_all, epoch, args)
        mse, mean_output = evaluate(model, x_test, args.sigma, args.pure_noise, args.amp)
        mean_loss = sum(losses[-batches:]) / batches
        msg = f"epoch {epoch} done in {time.time() - started:.0f}s, mean loss {mean_loss:.4f}"
        if args.pure_noise:
            to_mean = F.mse_loss(mean_output, mean_image).item()
            metrics.append({"epoch": epoch, "test_mse": mse, "mean_output_vs_mean_image_mse": to_mean})
            msg += f"; test MSE {mse:.4f}; MSE(mean output, mean image) {to_mean:.6f}"
        else:  # the trained sigma after every epoch; after the last, every sigma of SIGMAS on 1,000 digits
            for s in [args.sigma] + (SIGMAS if epoch == args.epochs else []):
                mse_s = mse if s == args.sigma else evaluate(model, x_test[:1000], s, amp=args.amp)[0]
                metrics.append({"epoch": epoch, "sigma": s, "test_mse": mse_s, "test_psnr_db": psnr(mse_s)})
                digits = "" if s == args.sigma else " (1,000 digits)"
                msg += f"\n  sigma {s}: test MSE {mse_s:.5f}, PSNR {psnr(mse_s):.2f} dB{digits}"
        save_progress(epoch, args, model, optimizer, losses, metrics)
        if epoch in (1, args.epochs):
            name = f"{'pure_noise' if args.pure_noise else 'denoised'}_epoch{epoch:02d}.png"
            epoch_figure(model, shown, args, epoch).save(os.path.join(args.out, name))
            msg += f"; wrote {name}"
        if epoch == args.epochs and args.pure_noise:
            img = figure([torch.stack([mean_image, mean_output])], [f"after epoch {epoch}"],
                         ["train mean", "mean D(z)"], f"MSE between them {to_mean:.1e}", zoom=4)
            img.save(os.path.join(args.out, "mean_image.png"))
        elif epoch == args.epochs:
            img = sigma_figure(shown[:3], model, f"trained at sigma {args.sigma} only")
            img.save(os.path.join(args.out, "ood.png"))
        print(msg, flush=True)


# --- outputs: figures, the loss curve, checkpoints ---------------------------


def grid_image(x, nrow=10, zoom=2):
    """A PIL image of the digits in x (N x 1 x 28 x 28), nrow per row, enlarged `zoom` times."""
    grid = torchvision.utils.make_grid(x.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=0.5)
    img = Image.fromarray(grid[0].mul(255).round().byte().numpy())
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)


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


@torch.inference_mode()
def sigma_figure(x, model=None, title="z = x + sigma * eps (eq. B.2)"):
    """The digits in x at every sigma of SIGMAS (eq. B.2) and, given a model, denoised in the row below."""
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for i, digit in enumerate(x):
        z = torch.stack([add_noise(digit, s, generator=g) for s in SIGMAS])
        rows += [z] if model is None else [z, model.eval()(z)]
        labels += [f"test digit {i + 1}"] if model is None else [f"digit {i + 1}: noisy z", "denoised D(z)"]
    return figure(rows, labels, [f"sigma {s}" for s in SIGMAS], title)


@torch.inference_mode()
def epoch_figure(model, x, args, epoch):
    """Test digits x noised at args.sigma and denoised; with --pure-noise, ten noises and their output."""
    g = torch.Generator().manual_seed(0)
    if args.pure_noise:
        z = torch.randn(10, 1, 28, 28, generator=g).to(x.device)
        return figure([z, model.eval()(z)], ["pure noise z", "output D(z)"],
                      title=f"denoising pure noise, after epoch {epoch}")
    z = add_noise(x, args.sigma, generator=g)
    return figure([x, z, model.eval()(z)], ["clean x", f"noisy z, sigma {args.sigma}", "denoised D(z)"],
                  title=f"test digits after epoch {epoch}")


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


def save_progress(epoch, args, model, optimizer, losses, metrics):
    """After each epoch: loss.csv, loss.png, metrics.csv and ckpt.pt, all that a resumed run needs."""
    batches = len(losses) // epoch
    with open(os.path.join(args.out, "loss.csv"), "w") as f:
        f.write("step,epoch,loss\n")
        f.writelines(f"{i + 1},{i // batches + 1},{v:.6f}\n" for i, v in enumerate(losses))
    with open(os.path.join(args.out, "metrics.csv"), "w") as f:
        f.write(",".join(metrics[-1]) + "\n")
        f.writelines(",".join(f"{v:.6g}" for v in row.values()) + "\n" for row in metrics)
    plot_loss(losses, batches, os.path.join(args.out, "loss.png"),
              "pure-noise denoiser" if args.pure_noise else f"one-step denoiser, sigma {args.sigma}")
    path = os.path.join(args.out, "ckpt.pt")
    torch.save({"script": SCRIPT, "epoch": epoch, "args": vars(args), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "losses": losses, "metrics": metrics,
                **random_streams(next(model.parameters()).device)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-save never leaves a broken checkpoint


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


# --- main --------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # model and objective
    add("--sigma", type=float, default=0.5, help="noise level, z = x + sigma eps (default: %(default)s)")
    add("--pure-noise", action="store_true", help="train on z = eps: denoise pure noise (default: off)")
    add("--hidden", type=int, default=128, metavar="D", help="UNet width D (default: %(default)s)")
    # optimisation
    add("--epochs", type=int, default=5, metavar="N", help="training epochs (default: %(default)s)")
    add("--batch-size", type=int, default=256, metavar="N", help="batch size (default: %(default)s)")
    add("--lr", type=float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    add("--limit", type=int, metavar="N", help="use the first N train and test images (default: all)")
    # input, output, system
    add("--data", default="data", help="MNIST root, downloaded if missing (default: %(default)s)")
    add("--out", help="output folder (default: runs/denoise, or runs/denoise_pure_noise)")
    add("--resume", metavar="CKPT", help="continue training from this checkpoint (default: start afresh)")
    add("--amp", action="store_true", help="bfloat16 autocast: CUDA 8.0+ (not a T4), MPS with torch 2.6+, "
        "CPUs (slow without AVX-512 BF16 or AMX) (default: off, fp32)")
    add("--log-every", type=int, default=50, help="steps between log lines (default: %(default)s)")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
        help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    add("--seed", type=int, default=180, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.hidden, args.epochs, args.batch_size, args.limit or 1, args.log_every) < 1:
        parser.error("--hidden, --epochs, --batch-size, --limit and --log-every must be at least 1")
    if not args.lr > 0 or not args.sigma >= 0:
        parser.error(f"--lr must be positive and --sigma at least 0, got {args.lr} and {args.sigma}")
    try:
        device = pick_device(args.device)
        if args.amp and amp_problem(device):
            raise ValueError(f"--amp: {amp_problem(device)}; run without --amp (fp32)")
    except ValueError as e:
        parser.error(str(e))
    args.out = args.out or os.path.join("runs", "denoise_pure_noise" if args.pure_noise else "denoise")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot write to --out {args.out} ({e.strerror}): choose another folder")
    if not args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt")):
        parser.error(f"{args.out} already holds a run: resume it with --resume, or choose another --out")

    torch.manual_seed(args.seed)
    try:
        train(args, device)
    except ValueError as e:
        sys.exit(f"denoise.py: error: {e}")


if __name__ == "__main__":
    main()
