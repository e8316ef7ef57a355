"""
One-step denoising on MNIST, the warm-up before flow matching (part 1 of the assignment).

A UNet D_theta maps a noisy digit z = x + sigma eps (B.2) back to the clean digit x, trained
by L2 regression (B.1). Trained at sigma = 0.5 it removes that noise well, and less well at
noise levels it never saw. Asked to turn pure noise z = eps into a digit (--pure-noise), it
can only answer with the average training image: z carries no information about x, and the
prediction that minimises the expected squared error is then E[x]. Generating digits needs
many small steps instead, which is what flow.py does.

    python denoise.py                   # 5 epochs at sigma 0.5: every Part 1 figure
    python denoise.py --pure-noise      # denoise pure noise: outputs beside the mean image
    python denoise.py --epochs 1 --limit 4096   # a quick check on a CPU

How long: the UNet (D = 128) trains at 29-41 images/s on a 2-core CPU in fp32, so the run
takes 154 minutes there with the test-set evaluations; with --amp (bfloat16) 76-100 images/s,
85 minutes. On a GPU, minutes. python denoise.py --benchmark measures yours.

Outputs go to --out (default samples/denoise, or samples/denoise_pure_noise): noising.png,
loss.csv, loss.png, denoised_epochNN.png, ood.png, metrics.csv and ckpt.pt; with
--pure-noise, pure_noise_epochNN.png and mean_image.png instead of the denoising figures.
The training loop, loss plot and checkpoints are flow.py's; the UNet is this file's own.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from flow import (benchmark, canvas, choose_device, epoch_list, grid_image, load_mnist, positive_float, positive_int,
                  prepare_out, resume, save_progress, train_epoch)

SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]  # the noise levels of the figures (B.2)

# -----------------------------------------------------------------------------
# building blocks (the assignment's standard UNet operations)


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


# -----------------------------------------------------------------------------
# the unconditional UNet


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


# -----------------------------------------------------------------------------
# noising, the loss (B.1) and evaluation


def add_noise(x, sigma, pure_noise=False, generator=None):
    """z = x + sigma eps (B.2), or the blank canvas z = eps when pure_noise."""
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    return eps if pure_noise else x + sigma * eps


def denoising_loss(model, x, sigma, pure_noise=False):
    """The L2 loss of B.1 on fresh noise: every epoch sees new noisy versions of each digit."""
    return F.mse_loss(model(add_noise(x, sigma, pure_noise)), x)


def to_float(images):
    return images.unsqueeze(1).float() / 255  # N x 28 x 28 uint8 -> N x 1 x 28 x 28 in [0, 1]


@torch.inference_mode()
def evaluate(model, images, sigma, pure_noise=False, batch_size=500, seed=0):
    """Mean squared error of D(z) against the clean images, and the mean output, with the noise
    fixed by seed so that epochs compare. BatchNorm uses its running statistics."""
    was_training = model.training
    model.eval()
    device = images.device
    generator = torch.Generator(device).manual_seed(seed)
    squared_error, output_sum = torch.zeros((), device=device), torch.zeros(1, 28, 28, device=device)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size])
        out = model(add_noise(x, sigma, pure_noise, generator))
        squared_error += (out - x).pow(2).sum()
        output_sum += out.sum(0)
    model.train(was_training)
    return squared_error.item() / images.numel(), output_sum / len(images)  # MSE per pixel


def psnr(mse):
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")  # pixels in [0, 1]


# -----------------------------------------------------------------------------
# figures: rows of digits with their labels


def figure(rows, row_labels, col_labels=None, title=None, scale=3):
    """Rows of digits (each N x 1 x 28 x 28, all of one length) as one labelled PIL image."""
    strips = [grid_image(row, nrow=len(row), scale=scale) for row in rows]
    left, top = 150, 8 + 22 * (title is not None) + 20 * (col_labels is not None)
    img, draw = canvas(left + strips[0].width + 8, top + sum(s.height for s in strips) + 8)
    if title:
        draw.text((img.width / 2, 6), title, fill="black", anchor="mt")
    for i, label in enumerate(col_labels or []):  # centred over column i
        draw.text((left + (2 + 30 * i + 14) * scale, top - 4), label, fill="black", anchor="mb")
    y = top
    for strip, label in zip(strips, row_labels):
        img.paste(strip, (left, y))
        draw.text((left - 8, y + strip.height / 2), label, fill="black", anchor="rm")
        y += strip.height
    return img


def noising_figure(x):
    """The same digits at every sigma of SIGMAS: one row a digit, one column a noise level."""
    g = torch.Generator(x.device).manual_seed(0)
    rows = [torch.stack([add_noise(digit, s, generator=g) for s in SIGMAS]) for digit in x]
    return figure(rows, [f"test digit {i + 1}" for i in range(len(x))], [f"sigma {s}" for s in SIGMAS],
                  "z = x + sigma * eps (B.2)")


@torch.inference_mode()
def denoised_figure(model, x, sigma, epoch):
    model.eval()
    z = add_noise(x, sigma, generator=torch.Generator(x.device).manual_seed(0))
    img = figure([x, z, model(z)], ["clean x", f"noisy z, sigma {sigma}", "denoised D(z)"],
                 title=f"test digits after epoch {epoch}")
    model.train()
    return img


@torch.inference_mode()
def ood_figure(model, x, trained_sigma):
    """Each digit noised at every sigma of SIGMAS (one row) and denoised (the row below)."""
    model.eval()
    g = torch.Generator(x.device).manual_seed(0)
    rows, labels = [], []
    for i, digit in enumerate(x):
        z = torch.stack([add_noise(digit, s, generator=g) for s in SIGMAS])
        rows += [z, model(z)]
        labels += [f"digit {i + 1}: noisy z", "denoised D(z)"]
    model.train()
    return figure(rows, labels, [f"sigma {s}" for s in SIGMAS], f"trained at sigma {trained_sigma} only")


@torch.inference_mode()
def pure_noise_figure(model, epoch, n=10):
    model.eval()
    device = next(model.parameters()).device
    z = torch.randn(n, 1, 28, 28, device=device, generator=torch.Generator(device).manual_seed(0))
    img = figure([z, model(z)], ["pure noise z", "output D(z)"], title=f"denoising pure noise, after epoch {epoch}")
    model.train()
    return img


# -----------------------------------------------------------------------------
# training


def train(args, device):
    model = UNet(args.hidden).to(device, memory_format=torch.channels_last)  # faster convolutions
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    losses, lrs, metrics, start_epoch = [], [], [], 1
    if args.resume:
        ckpt = resume("denoise.py", args, ("hidden", "batch_size", "epochs", "limit", "sigma", "pure_noise"),
                      model, optimizer)
        losses, lrs, metrics, start_epoch = ckpt["losses"], ckpt["lrs"], ckpt["metrics"], ckpt["epoch"] + 1
    if args.compile:
        model.compile()
    x_all, _ = load_mnist(args.data, device, args.limit)
    x_test, _ = load_mnist(args.data, device, args.limit, train=False)
    if len(x_all) < args.batch_size:
        raise ValueError(f"--limit {len(x_all)} is smaller than --batch-size {args.batch_size}: raise --limit")
    shown = to_float(x_test[:8])  # the test digits in every figure

    def batch_loss(idx):
        return denoising_loss(model, to_float(x_all[idx]), args.sigma, args.pure_noise)

    if args.benchmark:
        return benchmark(model, optimizer, batch_loss, len(x_all), args,
                         lambda: denoised_figure(model, shown, args.sigma, 0), "denoised figure")
    steps = len(x_all) // args.batch_size
    print(f"{'pure-noise' if args.pure_noise else f'sigma {args.sigma}'} denoiser, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(x_all):,} train and {len(x_test):,} "
          f"test images, {steps} steps per epoch, device {device}")
    if not args.pure_noise:
        noising_figure(shown[:4]).save(os.path.join(args.out, "noising.png"))
    mean_image = to_float(x_all).mean(0)  # 1 x 28 x 28, the MSE-optimal answer to pure noise

    for epoch in range(start_epoch, args.epochs + 1):
        t_epoch = time.time()
        lrs.append(optimizer.param_groups[0]["lr"])
        losses += train_epoch(model, optimizer, batch_loss, len(x_all), epoch, args)
        mse, mean_output = evaluate(model, x_test, args.sigma, args.pure_noise)
        msg = f"epoch {epoch} done in {time.time() - t_epoch:.1f}s, mean loss {sum(losses[-steps:]) / steps:.4f}"
        if args.pure_noise:
            to_mean = F.mse_loss(mean_output, mean_image).item()
            metrics.append({"epoch": epoch, "test_mse": mse, "mean_output_vs_mean_image_mse": to_mean})
            msg += f"; test MSE {mse:.4f}; MSE(mean output, mean image) {to_mean:.6f}"
        else:
            metrics.append({"epoch": epoch, "sigma": args.sigma, "test_mse": mse, "test_psnr_db": psnr(mse)})
            msg += f"; test MSE {mse:.5f}, PSNR {psnr(mse):.2f} dB at sigma {args.sigma}"
        if epoch == args.epochs and not args.pure_noise:  # out-of-distribution noise levels
            for s in SIGMAS:
                mse_s = mse if s == args.sigma else evaluate(model, x_test, s)[0]  # same noise seed: same answer
                metrics.append({"epoch": epoch, "sigma": s, "test_mse": mse_s, "test_psnr_db": psnr(mse_s)})
                msg += f"\n  sigma {s}: test MSE {mse_s:.5f}, PSNR {psnr(mse_s):.2f} dB"
            ood_figure(model, shown[:3], args.sigma).save(os.path.join(args.out, "ood.png"))
        save_progress("denoise.py", epoch, args, model, optimizer, None, losses, lrs,
                      "pure-noise denoiser" if args.pure_noise else f"one-step denoiser, sigma {args.sigma}",
                      metrics=metrics)
        with open(os.path.join(args.out, "metrics.csv"), "w") as f:
            f.write(",".join(metrics[0]) + "\n")
            f.writelines(",".join(f"{v:.6g}" for v in row.values()) + "\n" for row in metrics)
        if epoch in args.sample_epochs or epoch == args.epochs:
            name = f"{'pure_noise' if args.pure_noise else 'denoised'}_epoch{epoch:02d}.png"
            img = pure_noise_figure(model, epoch) if args.pure_noise else denoised_figure(model, shown, args.sigma, epoch)
            img.save(os.path.join(args.out, name))
            msg += f"; wrote {name}"
        if args.pure_noise and epoch == args.epochs:
            figure([torch.stack([mean_image, mean_output])], [f"after epoch {epoch}"], ["train mean", "mean D(z)"],
                   f"MSE between them {to_mean:.1e}", scale=4).save(os.path.join(args.out, "mean_image.png"))
        print(msg, flush=True)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    parser = argparse.ArgumentParser(description="One-step denoising UNet on MNIST (part 1 of the assignment).")
    # model and objective
    parser.add_argument("--sigma", type=float, default=0.5, help="noise level of training, z = x + sigma eps (default: %(default)s)")
    parser.add_argument("--pure-noise", action="store_true", help="train on z = eps: denoise pure noise (default: off)")
    parser.add_argument("--hidden", type=positive_int, default=128, metavar="D", help="hidden channels D of the UNet (default: %(default)s)")
    # optimisation
    parser.add_argument("--epochs", type=positive_int, default=5, metavar="N", help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="images per training step (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="use the first N train and test images, for quick runs (default: all)")
    parser.add_argument("--sample-epochs", type=epoch_list, default="1,5", help="epochs that get a figure; the last always does (default: %(default)s)")
    # input, output, system
    parser.add_argument("--data", default="data", help="MNIST root: reads DATA/MNIST/raw, downloads there if missing (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: samples/denoise, or samples/denoise_pure_noise)")
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue training from this checkpoint (default: start afresh)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for training (default: off, fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet for training; slow to start (default: off)")
    parser.add_argument("--benchmark", action="store_true", help="time 30 training steps and one figure, then exit (default: off)")
    parser.add_argument("--log-every", type=positive_int, default=50, metavar="N", help="steps between progress lines (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=180, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.sigma >= 0:
        parser.error(f"--sigma must be at least 0, got {args.sigma}")

    device = choose_device(args.device, parser)
    torch.manual_seed(args.seed)
    args.out = args.out or ("samples/denoise_pure_noise" if args.pure_noise else "samples/denoise")
    try:
        if not args.benchmark:
            prepare_out(args.out, args.resume)
        train(args, device)
    except ValueError as e:
        sys.exit(f"denoise.py: error: {e}")


if __name__ == "__main__":
    main()
