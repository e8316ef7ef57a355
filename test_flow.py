"""Smoke checks of denoise.py and flow.py on the CPU: python -m pytest -q test_flow.py"""
import argparse
import csv
import functools
import gzip
import hashlib
import http.server
import math
import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest
import torch
import torchvision
from PIL import Image

import denoise
import flow

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
UNPACK = os.path.join(HERE, "..", "shared", "mnist", "unpack.sh")


@pytest.fixture(scope="session")
def mnist():
    """The MNIST root data/: unpacked from ../shared/mnist, or downloaded by torchvision, when missing."""
    unpacked = os.path.exists(os.path.join(DATA, "MNIST", "raw", "train-images-idx3-ubyte"))
    if os.path.exists(UNPACK) and not unpacked:
        subprocess.run(["bash", UNPACK, DATA], check=True, capture_output=True)
    try:
        for train in (True, False):
            flow.load_mnist(DATA, "cpu", 1, train)
    except ValueError as e:
        pytest.skip(f"needs MNIST: {e}")
    return DATA


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """torchvision's MNIST download pointed at an empty local folder: it fails at once, online or offline."""
    mirror = tmp_path / "empty_mirror"
    mirror.mkdir()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [mirror.as_uri() + "/"])


@pytest.fixture(scope="session")
def class_run(mnist, tmp_path_factory):
    """One tiny class-conditioned run (1 epoch of 128 images, D = 8) that tests read but never change."""
    out = str(tmp_path_factory.mktemp("class_run"))
    run_flow(*tiny_flow_args(mnist, out, "--epochs", 1))
    return out


def run_flow(*argv):
    flow.main([str(a) for a in argv])


def tiny_flow_args(mnist, out, *extra):
    return ["--data", mnist, "--out", out, "--hidden", 8, "--limit", 128, "--batch-size", 32,
            "--steps", 3, "--log-every", 2, "--seed", 1, "--device", "cpu", *extra]


def flow_error(capsys, *argv):
    """Run flow.py expecting a clean failure; return its message."""
    with pytest.raises(SystemExit) as e:
        run_flow(*argv)
    assert e.value.code != 0
    message = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message
    return message


def run_denoise(*argv):
    denoise.main([str(a) for a in argv])


def tiny_denoise_args(mnist, out, *extra):
    return ["--data", mnist, "--out", out, "--hidden", 8, "--limit", 64, "--batch-size", 32, "--log-every", 1,
            "--seed", 1, "--device", "cpu", *extra]


def denoise_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        run_denoise(*argv)
    assert e.value.code != 0
    return str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err


# --- data --------------------------------------------------------------------------


def write_idx(path, data):
    """data (uint8) as a gzipped IDX file, MNIST's format; returns the file's MD5."""
    header = struct.pack(">BBBB", 0, 0, 8, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(data.flatten().tolist()))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_load_mnist_downloads_the_files_it_lacks(tmp_path, monkeypatch):
    """torchvision's own download, checksum and unpacking, from a web server on this machine that
    mirrors a made-up MNIST of 7 train and 3 test digits."""
    mirror, generator = tmp_path / "mirror", torch.Generator().manual_seed(0)
    mirror.mkdir()
    made, resources = {}, []
    for split, n in (("train", 7), ("t10k", 3)):
        made[split] = (torch.randint(0, 256, (n, 28, 28), generator=generator, dtype=torch.uint8),
                       torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8))
        for kind, data in zip(("images-idx3", "labels-idx1"), made[split]):
            name = f"{split}-{kind}-ubyte.gz"
            resources.append((name, write_idx(mirror / name, data)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=mirror)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    try:
        for split, train in (("train", True), ("t10k", False)):
            images, labels = flow.load_mnist(str(tmp_path / "data"), "cpu", train=train)
            assert torch.equal(images, made[split][0]) and torch.equal(labels, made[split][1].long())
    finally:
        server.shutdown()
    assert "t10k-labels-idx1-ubyte" in os.listdir(tmp_path / "data" / "MNIST" / "raw")


@pytest.mark.parametrize("script", [denoise, flow])
def test_missing_mnist_names_the_files(script, offline, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    message = str(e.value.code)
    assert "MNIST is not in" in message and "train-images-idx3-ubyte" in message
    assert "Traceback" not in message


# --- denoise.py: the one-step denoiser (Part 1) ------------------------------------


def test_denoiser_shapes_and_parameter_count():
    assert denoise.UNet(8)(torch.randn(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    assert sum(p.numel() for p in denoise.UNet(128).parameters()) == 7_891_073


def test_noising_adds_gaussian_noise_of_std_sigma():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    for sigma in (0.0, 0.5, 1.0):
        z = denoise.add_noise(x, sigma)
        assert abs((z - x).std().item() - sigma) < 0.01 and abs((z - x).mean().item()) < 0.01
    eps = denoise.add_noise(x, 0.5, pure_noise=True)  # the blank canvas: no trace of x
    correlation = torch.corrcoef(torch.stack([eps.flatten(), x.flatten()]))[0, 1]
    assert abs(eps.std().item() - 1) < 0.01 and abs(correlation) < 0.02


class Identity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return z


def test_evaluate_knows_the_mse_of_doing_nothing():
    images = torch.randint(0, 256, (1000, 28, 28), dtype=torch.uint8)
    mse, mean_output = denoise.evaluate(Identity(), images, sigma=0.5)
    assert mse == pytest.approx(0.25, rel=0.01)  # E|z - x|^2 = sigma^2 per pixel
    assert denoise.psnr(mse) == pytest.approx(10 * math.log10(4), abs=0.05)
    assert (mean_output - denoise.to_float(images).mean(0)).abs().mean() < 0.02  # noise averages out


def test_denoiser_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = denoise.UNet(8)
    x = torch.rand(16, 1, 28, 28).round()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        torch.manual_seed(1)  # the same noise every step
        loss = denoise.denoising_loss(model, x, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_denoise_runs_write_every_figure(mnist, tmp_path):
    out, pure = str(tmp_path / "denoise"), str(tmp_path / "pure")
    run_denoise(*tiny_denoise_args(mnist, out, "--epochs", 2))
    assert sorted(os.listdir(out)) == ["ckpt.pt", "denoised_epoch01.png", "denoised_epoch02.png", "loss.csv",
                                       "loss.png", "metrics.csv", "noising.png", "ood.png"]
    metrics = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [float(r["sigma"]) for r in metrics] == [0.5, 0.5] + denoise.SIGMAS  # 2 epochs, then every sigma
    # the same test at sigma 0.5
    assert metrics[1]["test_mse"] == metrics[2 + denoise.SIGMAS.index(0.5)]["test_mse"]
    assert all(float(r["test_psnr_db"]) == pytest.approx(10 * math.log10(1 / float(r["test_mse"])), rel=1e-4)
               for r in metrics)
    assert len(list(csv.DictReader(open(os.path.join(out, "loss.csv"))))) == 2 * 2
    for name in ("noising.png", "ood.png", "denoised_epoch02.png"):
        Image.open(os.path.join(out, name)).verify()

    run_denoise(*tiny_denoise_args(mnist, pure, "--epochs", 1, "--pure-noise"))
    assert sorted(os.listdir(pure)) == ["ckpt.pt", "loss.csv", "loss.png", "mean_image.png", "metrics.csv",
                                        "pure_noise_epoch01.png"]
    row = next(csv.DictReader(open(os.path.join(pure, "metrics.csv"))))
    model = denoise.UNet(8)
    model.load_state_dict(torch.load(os.path.join(pure, "ckpt.pt"), weights_only=True)["model"])
    x_all, x_test = (denoise.load_mnist(mnist, "cpu", 64, train)[0] for train in (True, False))
    mse, mean_output = denoise.evaluate(model, x_test, 0.5, pure_noise=True)
    to_mean = torch.nn.functional.mse_loss(mean_output, denoise.to_float(x_all).mean(0)).item()
    assert float(row["test_mse"]) == pytest.approx(mse, rel=1e-4)
    assert float(row["mean_output_vs_mean_image_mse"]) == pytest.approx(to_mean, rel=1e-4)


def test_denoise_resume_reproduces_an_uninterrupted_run(mnist, tmp_path, monkeypatch):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    run_denoise(*tiny_denoise_args(mnist, whole, "--epochs", 2))

    def crash(*a, **k):
        raise KeyboardInterrupt  # the machine goes down right after the epoch-1 checkpoint

    monkeypatch.setattr(denoise, "epoch_figure", crash)
    with pytest.raises(KeyboardInterrupt):
        run_denoise(*tiny_denoise_args(mnist, broken, "--epochs", 2))
    monkeypatch.undo()
    run_denoise(*tiny_denoise_args(mnist, broken, "--epochs", 2, "--resume", os.path.join(broken, "ckpt.pt")))
    a = torch.load(os.path.join(whole, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(broken, "ckpt.pt"), weights_only=True)
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_denoise_bad_input_is_refused(mnist, class_run, tmp_path, capsys):
    assert "--sigma" in denoise_error(capsys, "--sigma", "-1")
    assert "at least 1" in denoise_error(capsys, "--epochs", "0")
    assert "positive" in denoise_error(capsys, "--lr", "0")
    (tmp_path / "file").write_text("")
    assert "cannot write to --out" in denoise_error(capsys, "--out", tmp_path / "file" / "x")
    nan_run = tiny_denoise_args(mnist, tmp_path / "nan", "--epochs", 1, "--lr", 1e30)
    message = denoise_error(capsys, *nan_run)
    assert "at step" in message and "no checkpoint exists yet" in message
    assert not os.path.exists(tmp_path / "nan" / "ckpt.pt")
    flow_ckpt = os.path.join(class_run, "ckpt.pt")
    message = denoise_error(capsys, *tiny_denoise_args(mnist, tmp_path / "d", "--resume", flow_ckpt))
    assert "not a denoise.py checkpoint" in message
    run_denoise(*tiny_denoise_args(mnist, tmp_path / "d1", "--epochs", 1))
    message = denoise_error(capsys, *tiny_denoise_args(mnist, tmp_path / "d2", "--epochs", 1, "--pure-noise",
                                                       "--resume", tmp_path / "d1" / "ckpt.pt"))
    assert "--pure-noise False" in message


# --- flow.py, the assignment: the conditioned UNet -----------------------------------


def test_blocks_and_unet_shapes():
    x = torch.randn(2, 8, 28, 28)
    assert flow.ConvBlock(8, 16)(x).shape == (2, 16, 28, 28)
    assert flow.DownBlock(8, 16)(x).shape == (2, 16, 14, 14)
    assert flow.UpBlock(8, 16)(x).shape == (2, 16, 56, 56)
    assert flow.FCBlock(1, 16)(torch.rand(2, 1)).shape == (2, 16)
    x_t, t = torch.randn(3, 1, 28, 28), torch.rand(3, 1)
    assert flow.UNet(8)(x_t, t).shape == (3, 1, 28, 28)
    assert flow.UNet(8, 10)(x_t, t, torch.eye(10)[:3]).shape == (3, 1, 28, 28)


def test_parameter_counts_match_spec():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(flow.UNet(64)) == 1_996_417
    assert count(flow.UNet(64, num_classes=10)) == 2_019_201


@pytest.mark.parametrize("classes, expected", [(0, [1.53357255, 1.17511284, 0.97756350]),
                                                (10, [1.51919293, 1.20764816, 0.99511766])])
def test_default_unet_trains_as_the_assignments_did(classes, expected):
    """Three Adam steps' losses, measured before the opt-in time changes existed: with them off, the UNet,
    its initial weights and the loss's random draws are what they were."""
    torch.manual_seed(0)
    model = flow.UNet(8, classes)
    x1 = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = flow.flow_matching_loss(model, x1, torch.arange(16) % 10 if classes else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-5)


def test_time_conditioning_changes_the_output():
    # in training mode: a fresh UNet in eval mode damps the time signal to about 1e-5 of the output
    model = flow.UNet(8).train()
    x_t = torch.randn(2, 1, 28, 28)
    u0, u1 = model(x_t, torch.zeros(2, 1)), model(x_t, torch.ones(2, 1))
    assert (u0 - u1).abs().max() > 0.05 * u0.abs().max()


# --- flow matching: the loss and the sampler ---------------------------------------


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = flow.UNet(8, 10)
    x1, labels = torch.rand(16, 1, 28, 28).round(), torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        torch.manual_seed(1)  # the same x0, t and dropped classes every step: one fixed problem
        loss = flow.flow_matching_loss(model, x1, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


class Spy(torch.nn.Module):
    """A stand-in for the UNet: u = a x + b t + (class weights) . c, recording what it is fed."""

    def __init__(self, num_classes=10, method="flow"):
        super().__init__()
        self.num_classes, self.method = num_classes, method
        self.a, self.b = torch.nn.Parameter(torch.tensor(-0.7)), torch.nn.Parameter(torch.tensor(2.0))
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, num_classes))
        self.seen = []

    def forward(self, x_t, t, c=None):
        self.seen.append((x_t, t, c))
        u = self.a * x_t + self.b * t[:, :, None, None]
        return u if c is None else u + (c @ self.w)[:, None, None, None]


def test_loss_is_mse_to_the_straight_path_velocity():
    model = Spy()
    x1 = torch.rand(4, 1, 28, 28)
    torch.manual_seed(3)
    loss = flow.flow_matching_loss(model, x1)
    torch.manual_seed(3)  # the same draws, in the same order: x0, then t
    x0, t = torch.randn_like(x1), torch.rand(4, 1)
    x_t, _, _ = model.seen[0]
    assert torch.allclose(x_t, (1 - t[:, :, None, None]) * x0 + t[:, :, None, None] * x1)
    expected = ((model.a * x_t + model.b * t[:, :, None, None]) - (x1 - x0)).pow(2).mean()
    assert torch.allclose(loss, expected)
    x0, t = noise(4, seed=8), torch.tensor([[0.0], [0.25], [0.5], [1.0]])  # given, as reflow gives x0
    state = torch.get_rng_state()
    given = flow.flow_matching_loss(model, x1, x0=x0, t=t)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    x_t, t_seen, _ = model.seen[1]
    assert torch.equal(t_seen, t)
    assert torch.allclose(x_t, (1 - t[:, :, None, None]) * x0 + t[:, :, None, None] * x1)
    assert torch.allclose(given, ((model.a * x_t + model.b * t[:, :, None, None]) - (x1 - x0)).pow(2).mean())


def test_label_dropout_zeroes_about_p_uncond_of_the_classes():
    model = Spy()
    labels = torch.arange(20000) % 10
    flow.flow_matching_loss(model, torch.rand(20000, 1, 28, 28), labels, p_uncond=0.1)
    c = model.seen[0][2]
    dropped = (c.sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.015
    kept = c.sum(1) == 1
    assert torch.equal(c[kept].argmax(1), labels[kept])  # the rest stay the right one-hot


def noise(n, seed):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_euler_steps_equal_a_hand_computed_integration():
    model = Spy()
    x = noise(5, seed=7)
    for i in range(4):  # x <- x + (1/T) u(x, i/T), Algorithm B.2
        t = i / 4
        x = x + 0.25 * (model.a * x + model.b * t)
    assert torch.allclose(flow.sample(model, 5, steps=4, seed=7), x, atol=1e-6)


@pytest.mark.parametrize("guidance", [0.0, 1.0, 5.0])
def test_guidance_mixes_conditional_and_unconditional_flows(guidance):
    model = Spy()  # u_cond - u_uncond = w[k], so the guided velocity is a x + b t + gamma w[k]
    labels = torch.tensor([3, 1, 4, 1, 5])
    x = noise(5, seed=2)
    with torch.no_grad():
        for i in range(3):
            x = x + (model.a * x + model.b * i / 3 + guidance * model.w[labels][:, None, None, None]) / 3
    got = flow.sample(model, 5, labels, steps=3, guidance=guidance, seed=2)
    assert torch.allclose(got, x, atol=1e-6)
    assert len(model.seen) == 3  # one call a step
    for x_t, t, c in model.seen:  # one batch: the conditional half, then the unconditional half with c = 0
        if guidance == 1:  # u_uncond + 1 (u_cond - u_uncond) = u_cond: the unconditional half is not needed
            assert torch.equal(c, torch.eye(10)[labels])
            continue
        assert torch.equal(c, torch.cat([torch.eye(10)[labels], torch.zeros(5, 10)]))
        assert torch.equal(x_t[:5], x_t[5:]) and torch.equal(t[:5], t[5:])


def test_channels_last_gives_the_plain_result():
    torch.manual_seed(0)
    model = flow.UNet(8, 10).eval()
    x_t, t, c = torch.randn(4, 1, 28, 28), torch.rand(4, 1), torch.eye(10)[:4]
    with torch.no_grad():
        plain = model(x_t, t, c)
        fast = model.to(memory_format=torch.channels_last)(x_t, t, c)
    assert torch.allclose(plain, fast, atol=1e-5)


def test_bfloat16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = flow.UNet(8, 10)
    x1, labels = torch.rand(32, 1, 28, 28), torch.arange(32) % 10
    losses = []
    for amp in (False, True):
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            losses.append(flow.flow_matching_loss(model, x1, labels).item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02)  # bf16 keeps 8 bits of mantissa
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        fast = flow.sample(model, 10, torch.arange(10), steps=5, guidance=5.0)
    plain = flow.sample(model, 10, torch.arange(10), steps=5, guidance=5.0)
    assert fast.dtype == torch.float32 and (fast - plain).abs().mean() < 0.02 * plain.abs().mean()


def test_no_autocast_context_is_built_without_amp(mnist, tmp_path, monkeypatch):
    def refuse(*a, **k):  # as torch.autocast("mps", enabled=False) does on torch 2.2 to 2.4
        raise RuntimeError("unsupported autocast device_type")

    monkeypatch.setattr(torch, "autocast", refuse)
    run_flow(*tiny_flow_args(mnist, str(tmp_path / "run"), "--epochs", 1, "--ema", 0.9))  # trains, samples
    assert os.path.exists(tmp_path / "run" / "samples_epoch01.png")
    with pytest.raises(RuntimeError):
        flow.autocast(torch.device("cpu"), True)


def test_amp_runs_only_where_bfloat16_does(monkeypatch, capsys):
    assert flow.amp_problem(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert "Tesla T4 has no bfloat16 convolutions" in flow.amp_problem(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert flow.amp_problem(torch.device("cuda")) is None
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.4.1"))
    assert "needs torch 2.6 or newer" in flow.amp_problem(torch.device("mps"))
    monkeypatch.setattr(flow, "pick_device", lambda name: torch.device("mps"))
    for script, error in [(flow, flow_error), (denoise, denoise_error)]:
        monkeypatch.setattr(script, "pick_device", lambda name: torch.device("mps"))
        assert "run without --amp (fp32)" in error(capsys, "--amp", "--out", "unused")


def test_models_are_channels_last_but_on_mps():
    model = flow.to_device(flow.UNet(8), "cpu")  # faster convolutions; MPS: see the device tests below
    assert model.down1[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.down1[0][0].weight.is_contiguous()


def test_training_reads_the_loss_back_on_log_steps_only(mnist, monkeypatch):
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append("item") or tolist(self))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))
    args = argparse.Namespace(batch_size=32, amp=False, p_uncond=0.1, log_every=100, epochs=1, sigma=0.5,
                              pure_noise=False)
    images, labels = flow.load_mnist(mnist, "cpu", 128)
    model = flow.UNet(8, 10)
    flow.train_epoch(model, torch.optim.SGD(model.parameters()), (images, labels), 1, args)  # SGD reads none
    assert len(reads) <= 2  # the log line after the last of 4 steps, and the epoch's losses
    reads.clear()
    model = denoise.UNet(8)
    denoise.train_epoch(model, torch.optim.SGD(model.parameters()), images, 1, args)
    assert len(reads) <= 2


def test_sampling_leaves_training_mode_and_global_rng_alone():
    model = flow.UNet(8).train()
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    flow.sample(model, 2, steps=2)
    assert model.training and torch.equal(torch.rand(1), before)


def test_sampling_uses_the_batchnorm_statistics_of_training_and_leaves_them_as_they_were():
    torch.manual_seed(0)
    model = flow.UNet(8).train()
    model(torch.rand(16, 1, 28, 28), torch.rand(16, 1))  # running statistics unlike a fresh network's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one, four = flow.sample(model, 1, steps=2, seed=3), flow.sample(model, 4, steps=2, seed=3)
    assert torch.allclose(one, four[:1], atol=1e-5)  # a digit does not depend on the batch it is drawn in
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --- training: outputs, grids, checkpoints, resume ---------------------------------


class OneWeight(torch.nn.Module):
    """A model of one weight w, for training loops whose every step is known by heart."""

    def __init__(self):
        super().__init__()
        self.w, self.num_classes, self.seen = torch.nn.Parameter(torch.tensor(0.0)), 10, []


def test_each_training_step_sees_its_own_batch_in_0_1_and_its_own_gradient(capsys):
    """x1 reaches the loss as pixels / 255, and zero_grad makes each step's gradient its batch's alone:
    with loss = w and SGD at rate 1, w falls by exactly 1 a step (without zero_grad: 1, 2, 3, ...)."""
    model = OneWeight()

    def loss_fn(model, x1, labels, p_uncond):
        model.seen.append((x1, labels))
        return model.w * 1.0

    images, labels = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8), torch.arange(12) % 10
    args = argparse.Namespace(batch_size=4, amp=False, p_uncond=0.1, log_every=1, epochs=1)
    losses = flow.train_epoch(model, torch.optim.SGD(model.parameters(), lr=1.0), (images, labels), 1, args,
                              loss_fn)
    assert losses == [0.0, -1.0, -2.0] and model.w.item() == -3.0
    seen = torch.cat([x1 for x1, _ in model.seen])
    assert seen.shape == (12, 1, 28, 28) and 0 <= seen.min() and seen.max() <= 1
    assert sorted(seen.flatten().tolist()) == sorted((images.float() / 255).flatten().tolist())  # each once


def test_tiny_run_writes_every_output(mnist, tmp_path):
    out = str(tmp_path / "run")
    run_flow(*tiny_flow_args(mnist, out, "--epochs", 3, "--sample-epochs", "2", "--gif"))
    rows = list(csv.DictReader(open(os.path.join(out, "loss.csv"))))
    assert len(rows) == 3 * 4 and [int(r["epoch"]) for r in rows[::4]] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.csv", "loss.png", "model.pt", "samples_epoch02.png",
                                       "samples_epoch03.png", "sampling.gif"]
    grid = Image.open(os.path.join(out, "samples_epoch03.png"))
    assert grid.size == (2 * (10 * 30 + 2), 2 * (4 * 30 + 2))  # 4 rows of 10 digits, enlarged 2x
    gif = Image.open(os.path.join(out, "sampling.gif"))
    assert gif.n_frames == 3 + 1 and gif.size == grid.size  # x at t = 0, 1/3, 2/3, 1
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["epoch"] == 3 and len(ckpt["losses"]) == 12
    # the learning rate decays by 10x over the run, once per epoch
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3, rel=1e-6)
    assert float(rows[-1]["lr"]) == pytest.approx(1e-2 * 0.1 ** (2 / 3), rel=1e-5)
    model = flow.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert not model.training and model.num_classes == 10


def test_the_code_above_the_banner_runs_the_assignment_alone(mnist, tmp_path):
    text = open(os.path.join(HERE, "flow.py")).read()
    above = text[:text.index("# =" + "=" * 29 + " beyond the assignment")]
    code = above[above.index('"""', 3):]  # below the file's docstring, which tells both halves
    for name in ("ema", "ddpm", "reflow", "sinusoidal", "autoguid", "likelihood", "evaluate", "midpoint"):
        assert name not in code.lower(), name  # the assignment's code names no extension
    namespace = {"__name__": "assignment", "__file__": os.path.join(tmp_path, "assignment.py")}
    exec(compile(above, "assignment.py", "exec"), namespace)
    out = tmp_path / "run"
    namespace["assignment"]([str(a) for a in tiny_flow_args(mnist, out, "--epochs", 2, "--steps", 2)])
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.csv", "loss.png", "model.pt", "samples_epoch01.png",
                                       "samples_epoch02.png"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["steps"] == 2 and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert flow.load_checkpoint(out / "model.pt").num_classes == 10  # the code below reads what it wrote
    time_run = ["--data", mnist, "--out", tmp_path / "time", "--cond", "time", "--hidden", 8, "--limit", 64,
                "--epochs", 1, "--device", "cpu"]
    namespace["assignment"]([str(a) for a in time_run])
    ckpt = torch.load(tmp_path / "time" / "ckpt.pt", weights_only=True)
    assert (ckpt["args"]["steps"], ckpt["args"]["guidance"]) == (50, 5.0)  # the assignment's defaults


def test_a_run_with_only_the_assignments_flags_is_the_assignments_run(mnist, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(flow, "train_beyond", lambda args, device: calls.append("beyond"))
    run = flow.run
    monkeypatch.setattr(flow, "run", lambda args, device: calls.append("assignment") or run(args, device))
    run_flow(*tiny_flow_args(mnist, tmp_path / "plain", "--epochs", 1, "--cond", "class", "--amp"))
    run_flow(*tiny_flow_args(mnist, tmp_path / "ema", "--epochs", 1, "--ema", 0.9))
    assert calls == ["assignment", "beyond"]
    ckpt = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["method"] == "flow" and ckpt["args"]["ema"] == 0  # every flag, for all code to read
    assert not any(group.get("fused") for group in ckpt["optimizer"]["param_groups"])  # resumes on any device


def test_class_grid_puts_the_four_samples_of_digit_k_in_column_k():
    model = Spy()
    with torch.no_grad():  # u = -x + w[k] and one Euler step from t = 0: the sample is w[k] everywhere
        model.a.fill_(-1.0), model.b.fill_(0.0), model.w.copy_(torch.linspace(0, 1, 10))
    args = argparse.Namespace(amp=False, steps=1, guidance=1.0, seed=0)
    grid = flow.sample_grid(model, args)
    assert grid.size == (2 * (10 * 30 + 2), 2 * (4 * 30 + 2))
    for row in range(4):
        for k in range(10):  # the middle of each 28-pixel digit, past the 2-pixel borders, enlarged 2x
            assert grid.getpixel((2 * (2 + 30 * k + 14), 2 * (2 + 30 * row + 14))) == round(255 * k / 9)


def test_model_pt_holds_half_precision_weights_that_load_as_the_model(class_run):
    weights = torch.load(os.path.join(class_run, "model.pt"), weights_only=True)
    assert set(weights) == {"script", "epoch", "args", "model"} and weights["epoch"] == 1
    full = flow.load_checkpoint(os.path.join(class_run, "ckpt.pt"))
    params = dict(full.named_parameters())
    for name, value in weights["model"].items():  # BatchNorm statistics in fp32: a variance may pass 65504
        if value.is_floating_point():
            assert value.dtype == (torch.float16 if name in params else torch.float32), name
    half = flow.load_checkpoint(os.path.join(class_run, "model.pt"))
    for name, value in full.state_dict().items():
        assert torch.allclose(half.state_dict()[name], value, rtol=1e-3, atol=1e-4)
    labels = torch.arange(10)
    same_digits = flow.sample(half, 10, labels, steps=3), flow.sample(full, 10, labels, steps=3)
    assert torch.allclose(*same_digits, atol=1e-2)


@pytest.mark.parametrize("method,cond,ema", [("flow", "class", 0), ("ddpm", "time", 0),
                                             ("flow", "class", 0.9)])
def test_resume_reproduces_an_uninterrupted_run(mnist, tmp_path, monkeypatch, method, cond, ema):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    args = ("--epochs", 2, "--sample-epochs", "1", "--method", method, "--cond", cond, "--ema", ema)
    run_flow(*tiny_flow_args(mnist, whole, *args))

    def crash(*a, **k):
        raise KeyboardInterrupt  # the machine goes down right after the epoch-1 checkpoint

    monkeypatch.setattr(flow, "sample_grid", crash)
    with pytest.raises(KeyboardInterrupt):
        run_flow(*tiny_flow_args(mnist, broken, *args))
    monkeypatch.undo()
    assert torch.load(os.path.join(broken, "ckpt.pt"), weights_only=True)["epoch"] == 1
    run_flow(*tiny_flow_args(mnist, broken, *args, "--resume", os.path.join(broken, "ckpt.pt")))
    a = torch.load(os.path.join(whole, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(broken, "ckpt.pt"), weights_only=True)
    assert a["losses"] == b["losses"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert open(os.path.join(whole, "loss.csv")).read() == open(os.path.join(broken, "loss.csv")).read()
    if ema:  # the average, kept in the optimizer's state, resumes with it: weights, statistics, its count
        assert a["optimizer"]["ema_updates"] == b["optimizer"]["ema_updates"] == 2 * 4
        for name, value in a["optimizer"]["ema"].items():
            assert torch.equal(value, b["optimizer"]["ema"][name]), name


def test_resume_takes_the_checkpoints_flags_and_refuses_one_typed_otherwise(mnist, class_run, tmp_path,
                                                                          capsys, monkeypatch):
    ckpt = os.path.join(class_run, "ckpt.pt")
    message = flow_error(capsys, "--resume", ckpt, "--hidden", 16)
    assert "was trained with --hidden 8, not with --hidden 16: leave it out to resume" in message
    message = flow_error(capsys, "--resume", ckpt, "--sinusoidal-t")
    assert "was trained without --sinusoidal-t, not with --sinusoidal-t" in message
    assert "holds weights alone" in flow_error(capsys, "--resume", os.path.join(class_run, "model.pt"))
    old = torch.load(ckpt, weights_only=True)
    del old["args"]["method"]  # written before --method existed: it trained flow matching
    flow.save_checkpoint(str(tmp_path / "old.pt"), old)
    assert "trained with --method flow, not with --method ddpm" in flow_error(
        capsys, "--resume", tmp_path / "old.pt", "--method", "ddpm")
    seen = []
    monkeypatch.setattr(flow, "train", lambda args, *rest: seen.append(args))
    run_flow("--resume", ckpt, "--epochs", 1)  # typed as trained: allowed
    args = seen[0]
    assert (args.hidden, args.limit, args.batch_size, args.out) == (8, 128, 32, class_run)  # its own folder
    other = tmp_path / "other"
    monkeypatch.undo()
    run_flow(*tiny_flow_args(mnist, other, "--epochs", 1))
    assert "already holds a run" in flow_error(capsys, "--resume", ckpt, "--out", other)


# --- flow.py beyond the assignment: better time input -------------------------------


def test_sinusoidal_t_feeds_sines_and_cosines_of_t():
    t = torch.tensor([[0.0], [0.25]])
    features = flow.time_features(t)
    freqs = 10 ** torch.linspace(0, 3, 16, dtype=torch.float64)  # 1 to 1000, evenly on a log scale
    assert features.shape == (2, 32)
    assert torch.equal(features[0], torch.cat([torch.zeros(16), torch.ones(16)]))  # sin 0, cos 0
    expected = torch.cat([torch.sin(0.25 * freqs), torch.cos(0.25 * freqs)])
    assert torch.allclose(features[1].double(), expected, atol=1e-5)
    model = flow.TimeUNet(8, 10, sinusoidal_t=True)
    assert model.fc1_t[0].in_features == model.fc2_t[0].in_features == 32
    assert model(torch.randn(3, 1, 28, 28), torch.rand(3, 1), torch.eye(10)[:3]).shape == (3, 1, 28, 28)


def test_time_every_block_starts_as_the_plain_unet_then_follows_t():
    torch.manual_seed(0)
    film = flow.TimeUNet(8, 10, time_every_block=True).train()
    plain = flow.UNet(8, 10).train()
    plain.load_state_dict({k: v for k, v in film.state_dict().items() if not k.startswith("film")})
    extra = sum(p.numel() for p in film.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(2 * n + 2 * n for n in (8, 8, 16, 8, 8))  # a Linear(1, 2n) per block
    x_t, c = torch.randn(4, 1, 28, 28), torch.eye(10)[:4]
    t = torch.tensor([[0.1], [0.4], [0.6], [0.9]])
    assert torch.equal(film(x_t, t, c), plain(x_t, t, c))  # the scales and shifts start at zero
    with torch.no_grad():
        for layer in film.film:
            layer.weight.normal_()
    moved = (film(x_t, t, c) - plain(x_t, t, c)).abs().amax((1, 2, 3))
    assert (moved > 1e-3).all()
    film(x_t, t, c).square().mean().backward()  # each of the five blocks is modulated, so each learns
    assert all(layer.weight.grad.abs().sum() > 0 for layer in film.film)


def test_logit_normal_t_draws_sigmoid_of_a_normal():
    model, x1 = Spy(), torch.rand(20000, 1, 1, 1)
    torch.manual_seed(3)
    flow.logit_normal_loss(model, x1)
    torch.manual_seed(3)  # the same draws, in the same order: x0, then t
    torch.randn(20000, 1, 1, 1)
    t = model.seen[0][1]
    assert torch.equal(t, torch.randn(20000, 1).sigmoid())
    middle = ((t > 0.25) & (t < 0.75)).float().mean().item()  # P(|z| < ln 3) = 0.73; uniform t: 0.50
    assert middle == pytest.approx(0.73, abs=0.015)


def test_time_flags_are_saved_and_rebuild_their_unet(mnist, tmp_path, capsys, monkeypatch):
    out, drawn = str(tmp_path / "run"), []
    loss = flow.logit_normal_loss
    monkeypatch.setattr(flow, "logit_normal_loss", lambda *a: drawn.append(len(a)) or loss(*a))
    flags = ("--cond", "time", "--sinusoidal-t", "--time-every-block", "--logit-normal-t")
    run_flow(*tiny_flow_args(mnist, out, "--epochs", 1, *flags))
    assert drawn == [4] * 4  # every training step: model, x1, labels, p_uncond
    for name in ("ckpt.pt", "model.pt"):  # the weights load only into the UNet these flags describe
        model = flow.load_checkpoint(os.path.join(out, name))
        assert model.sinusoidal_t and len(model.film) == 5 and model.fc1_t[0].in_features == 32


# --- EMA ---------------------------------------------------------------------------


def test_ema_of_a_constant_stays_and_follows_a_step_at_its_rate_after_a_warm_up():
    model, ema = flow.UNet(8), flow.UNet(8)
    ema.load_state_dict(model.state_dict())
    model.train()(torch.randn(4, 1, 28, 28), torch.rand(4, 1))  # BatchNorm statistics move; the weights stay
    for _ in range(5):
        flow.update_ema(ema, model, 0.9, 10 ** 6)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))
    start = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a step change of +1 in every weight
    for _ in range(10):
        flow.update_ema(ema, model, 0.9, 10 ** 6)
    for e, s in zip(ema.parameters(), start):  # 1 - 0.9^10 of the way there
        assert torch.allclose(e - s, torch.full_like(s, 1 - 0.9 ** 10), atol=1e-5)
    for step in range(3):  # steps 0, 1, 2 keep 1/10, 2/11, 3/12 of the average, whatever the decay
        flow.update_ema(ema, model, 0.999, step)
    gap = 0.9 ** 10 * (1 / 10) * (2 / 11) * (3 / 12)
    for e, s in zip(ema.parameters(), start):
        assert torch.allclose(e - s, torch.full_like(s, 1 - gap), atol=1e-5)
    assert all(torch.equal(e, b) for e, b in zip(ema.buffers(), flow.UNet(8).buffers()))  # left alone


def test_ema_batchnorm_statistics_are_averaged_over_its_own_activations_off_the_random_stream():
    torch.manual_seed(0)
    ema = flow.UNet(8)
    norm, seen = ema.conv_in[0][1], []  # the first BatchNorm, and what it is given
    norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x_all, y_all = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8), torch.zeros(50, dtype=torch.long)
    state = torch.get_rng_state()
    args = argparse.Namespace(amp=False, p_uncond=0)
    flow.measure_batchnorm(ema, flow.flow_matching_loss, (x_all, y_all), args, batches=3, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)  # training goes on as if there were no EMA
    assert len(seen) == 3 and not ema.training and norm.momentum == 0.1
    mean = torch.stack([h.mean((0, 2, 3)) for h in seen]).mean(0)  # the plain average of the 3 batches
    var = torch.stack([h.var((0, 2, 3)) for h in seen]).mean(0)
    assert torch.allclose(norm.running_mean, mean, atol=1e-6)
    assert torch.allclose(norm.running_var, var, rtol=1e-5)


def test_ema_run_samples_from_the_averaged_weights(mnist, tmp_path):
    out = str(tmp_path / "run")
    run_flow(*tiny_flow_args(mnist, out, "--epochs", 1, "--ema", 0.5))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    name = "conv_out.1.weight"
    assert not torch.equal(ckpt["optimizer"]["ema"][name], ckpt["model"][name])
    shipped = torch.load(os.path.join(out, "model.pt"), weights_only=True)["model"]
    assert torch.equal(shipped[name], ckpt["optimizer"]["ema"][name].half())
    ema = flow.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert torch.equal(ema.state_dict()[name], ckpt["optimizer"]["ema"][name])
    raw = flow.UNet(8, 10)
    raw.load_state_dict(ckpt["model"])
    grid = Image.open(os.path.join(out, "samples_epoch01.png"))
    args = argparse.Namespace(**ckpt["args"])
    assert flow.sample_grid(ema, args).tobytes() == grid.tobytes()  # drawn by the average
    assert flow.sample_grid(raw.to(memory_format=torch.channels_last), args).tobytes() != grid.tobytes()


# --- DDPM on the same UNet ---------------------------------------------------------


def test_ddpm_schedule_runs_from_beta_1e4_to_2e2_with_alpha_bar_falling():
    a = flow.alpha_bar().double()
    assert len(a) == flow.NOISE_LEVELS + 1 and a[0] == 1
    betas = 1 - a[1:] / a[:-1]
    assert betas[0] == pytest.approx(1e-4, rel=1e-3) and betas[-1] == pytest.approx(0.02, rel=1e-3)
    assert (a[1:] < a[:-1]).all() and a[-1] < 0.05  # nearly pure noise at t = NOISE_LEVELS


def test_ddpm_loss_is_mse_to_the_noise():
    model = Spy(method="ddpm")
    x1, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 5, 9])
    torch.manual_seed(3)
    loss = flow.ddpm_loss(model, x1, labels, p_uncond=0.0)
    torch.manual_seed(3)  # the same draws, in the same order: eps, then t
    eps, t = torch.randn_like(x1), torch.randint(1, flow.NOISE_LEVELS + 1, (4, 1))
    betas = torch.linspace(1e-4, 0.02, flow.NOISE_LEVELS).double()
    a = torch.stack([(1 - betas[:k]).prod() for k in t[:, 0]]).float()[:, None, None, None]
    x_t, t_in, c = model.seen[0]
    assert torch.allclose(x_t, a.sqrt() * x1 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(t_in, t / flow.NOISE_LEVELS) and torch.equal(c, torch.eye(10)[labels])
    expected = (model(x_t, t_in, c) - eps).pow(2).mean()
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_one_ddpm_step_with_the_true_noise_matches_the_formulas(solver):
    """From t = 300 with 300 steps: the ancestral step as specified; DDIM's
    sqrt(a_s) x1 + sqrt(1 - a_s) eps, x1 the digit."""
    x1, eps = torch.rand(3, 1, 28, 28), noise(3, seed=1)
    betas = torch.linspace(1e-4, 0.02, flow.NOISE_LEVELS).double()
    a_t, a_s, beta = (1 - betas).prod(), (1 - betas[:-1]).prod(), betas[-1]
    x_t = (a_t.sqrt() * x1 + (1 - a_t).sqrt() * eps).float()
    step = flow.solver_step(flow.build_unet({"cond": "time", "hidden": 8, "method": "ddpm"}), solver)
    torch.manual_seed(9)
    got = step(lambda x, t: eps, x_t, 0, flow.NOISE_LEVELS)
    if solver == "ddim":
        expected = a_s.sqrt() * x1 + (1 - a_s).sqrt() * eps
    else:
        z = torch.randn(x1.shape, generator=torch.Generator().manual_seed(9))
        expected = (a_s.sqrt() * beta / (1 - a_t) * x1 + (1 - beta).sqrt() * (1 - a_s) / (1 - a_t) * x_t
                    + beta.sqrt() * z)
    assert torch.allclose(got, expected.float(), atol=1e-5)
    last = step(lambda x, t: eps, x_t, flow.NOISE_LEVELS - 1, flow.NOISE_LEVELS)  # t = 1 -> 0
    assert torch.allclose(last, ((x_t - (1 - flow.alpha_bar()[1]).sqrt() * eps) / flow.alpha_bar()[1].sqrt()))


class GaussianPixels(torch.nn.Module):
    """The exact noise predictor of a DDPM model when the data's pixels are independent N(mu, s^2):
    eps = (x_t - sqrt(a_t) E[x1 | x_t]) / sqrt(1 - a_t), with E[x1 | x_t] linear in x_t (x1 the digit)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.num_classes, self.method = mu, s, 0, "ddpm"
        self.device_holder = torch.nn.Parameter(torch.zeros(()))  # sample() finds the device here

    def forward(self, x_t, t, c=None):
        a = flow.alpha_bar()[(t * flow.NOISE_LEVELS).round().long()][:, :, None, None]
        x1 = self.mu + a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * (x_t - a.sqrt() * self.mu)
        return (x_t - a.sqrt() * x1) / (1 - a).sqrt()


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_ddpm_samplers_given_the_exact_noise_draw_from_the_data_distribution(solver):
    model = GaussianPixels(0.3, 0.2)
    step_fn = flow.solver_step(model, solver)
    x = flow.sample(model, 64, steps=flow.NOISE_LEVELS, step_fn=step_fn, seed=1)  # 50,176 pixels
    # measured: mean 0.300 and 0.287 (DDIM keeps the error of starting at N(0, I)), std 0.202 and 0.203
    assert x.mean().item() == pytest.approx(0.3, abs=0.02) and x.std().item() == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_only_the_ancestral_sampler_draws_noise_after_the_start(solver):
    x, step = noise(2, seed=0), flow.SOLVERS["ddpm"][solver]
    for i in range(3):  # t = 300 -> 200 -> 100 -> 0
        before = torch.get_rng_state()
        x = step(lambda x, t: 0.5 * x, x, i, 3)
        drew = not torch.equal(torch.get_rng_state(), before)
        assert drew == (solver == "ddpm" and i < 2), i  # the last step, to t = 0, adds no noise


def test_ddpm_run_takes_its_defaults_and_writes_every_output(mnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_flow("--method", "ddpm", "--data", mnist, "--out", out, "--hidden", 8, "--limit", 256, "--epochs", 1,
             "--steps", 4, "--cond", "class")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.csv", "loss.png", "model.pt", "samples_epoch01.png"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    args = ckpt["args"]
    assert (args["batch_size"], args["lr"], args["sample_epochs"]) == (128, 1e-3, [1, 5, 10, 20])
    assert len(ckpt["losses"]) == 256 // 128 and ckpt["args"]["solver"] == "ddpm"
    model = flow.load_checkpoint(os.path.join(out, "model.pt"))
    assert model.method == "ddpm" and model.num_classes == 10
    assert "ddpm or ddim" in flow_error(capsys, "--sample-only", "--ckpt", os.path.join(out, "model.pt"),
                                        "--solver", "euler")
    assert "euler or midpoint" in flow_error(capsys, "--method", "flow", "--solver", "ddim")


# --- more solvers ------------------------------------------------------------------


@pytest.mark.parametrize("solver,nfe", [("euler", 1), ("midpoint", 2), ("ddpm", 1), ("ddim", 1)])
def test_solvers_call_the_network_as_often_as_they_claim(solver, nfe):
    model = Spy(method="ddpm" if solver in flow.SOLVERS["ddpm"] else "flow")
    flow.sample(model, 2, steps=5, step_fn=flow.solver_step(model, solver))
    assert len(model.seen) == 5 * nfe


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2)])
def test_solvers_converge_at_their_order_on_a_known_flow(solver, order):
    model = Spy()
    a, b = model.a.item(), model.b.item()
    x0 = noise(3, seed=4).double()
    exact = math.exp(a) * x0 + b * (math.exp(a) - 1 - a) / a ** 2  # dx/dt = a x + b t, solved
    model = model.double()
    step = flow.solver_step(model, solver)
    errors = [(flow.sample(model, 3, steps=n, seed=4, step_fn=step).double() - exact).abs().max().item()
              for n in (8, 16, 32)]
    for coarse, fine in zip(errors, errors[1:]):  # doubling the steps divides the error by 2^order
        assert coarse / fine == pytest.approx(2 ** order, rel=0.15), errors


def test_samplers_refuse_the_other_method():
    ddpm = flow.build_unet({"cond": "time", "hidden": 8, "method": "ddpm"})
    with pytest.raises(ValueError, match="euler or midpoint"):
        flow.solver_step(flow.UNet(8), "ddim")
    with pytest.raises(ValueError, match="ddpm or ddim"):
        flow.solver_step(ddpm, "euler")
    with pytest.raises(ValueError, match="300 or fewer"):
        flow.sample(ddpm, 1, steps=301, step_fn=flow.solver_step(ddpm, "ddpm"))


# --- autoguidance ------------------------------------------------------------------


@pytest.mark.parametrize("classes", [0, 10])
def test_autoguidance_moves_away_from_the_guides_prediction(classes):
    model, guide, mixed, gamma = Spy(classes), Spy(classes), Spy(classes), 3.0
    with torch.no_grad():  # u is linear in a Spy's parameters: u_guide + gamma (u - u_guide) is a Spy's u
        guide.a.fill_(-0.2), guide.b.fill_(0.5), guide.w.mul_(-2)
        for m, p, g in zip(mixed.parameters(), model.parameters(), guide.parameters()):
            m.copy_(g + gamma * (p - g))
    labels = torch.tensor([3, 1, 4, 1, 5]) if classes else None
    got = flow.sample(flow.Autoguided(model, guide, gamma), 5, labels, steps=3, guidance=1.0, seed=2)
    assert torch.allclose(got, flow.sample(mixed, 5, labels, steps=3, guidance=1.0, seed=2), atol=1e-5)
    assert len(model.seen) == len(guide.seen) == 3  # one call of each a step, with the same input
    for (x, t, c), (x_g, t_g, c_g) in zip(model.seen, guide.seen):  # the guide is asked for the same class
        assert torch.equal(x, x_g) and torch.equal(t, t_g)
        if classes:
            assert torch.equal(c, torch.eye(10)[labels]) and torch.equal(c_g, c)
        else:
            assert c is c_g is None


# --- reflow ------------------------------------------------------------------------


class StraightFlow(torch.nn.Module):
    """A flow whose paths are already straight: each x0 moves on the line to x1 = s x0 + m, whatever the
    class, so u(x_t, t) = (s - 1) x0 + m with x0 = (x_t - t m) / (1 - t + t s). s and m can be learned."""

    def __init__(self, s, m):
        super().__init__()
        self.num_classes, self.method = 10, "flow"
        self.s, self.m = torch.nn.Parameter(torch.tensor(s)), torch.nn.Parameter(torch.tensor(m))

    def forward(self, x_t, t, c=None):
        t = t[:, :, None, None]
        return (self.s - 1) * (x_t - t * self.m) / (1 - t + t * self.s) + self.m


def reflow_args(tmp_path, pairs, seed=3):
    return argparse.Namespace(out=str(tmp_path), reflow="teacher.pt", seed=seed, amp=False, pairs=pairs)


def test_pairs_are_the_teachers_samples_from_seeded_noise(tmp_path):
    teacher = StraightFlow(0.05, 0.5)
    x1, labels, x0 = flow.make_pairs(teacher, reflow_args(tmp_path, 150))
    assert x1.dtype == torch.uint8 and x1.shape == (150, 28, 28) and x0.shape == (150, 1, 28, 28)
    assert torch.equal(labels, torch.arange(150) % 10)
    for j, seed in ((0, 3 + 10 ** 6), (100, 3 + 10 ** 6 + 1)):  # a batch of 100 from each seed
        assert torch.equal(x0[j:j + 100], noise(100, seed)[:len(x0) - j])
    exact = (0.05 * x0 + 0.5).squeeze(1).clamp(0, 1) * 255  # where the straight lines end
    assert (x1.float() - exact).abs().max() <= 0.5 + 1e-3  # the teacher's midpoint steps land there
    teacher_x1 = flow.sample(teacher, 50, labels[100:], 5, 2.0, 3 + 10 ** 6 + 1, flow.midpoint_step)
    assert torch.equal(x1[100:], teacher_x1.clamp(0, 1).mul(255).round().byte().squeeze(1))


def test_pair_making_resumes_to_the_same_pairs_and_refuses_others(tmp_path):
    teacher, calls = StraightFlow(0.05, 0.5), []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    args = reflow_args(tmp_path, 250)
    whole = flow.make_pairs(teacher, args, per_file=100, batch_size=50)
    assert sorted(os.listdir(tmp_path / "pairs")) == ["pairs_000.pt", "pairs_001.pt", "pairs_002.pt"]
    os.remove(tmp_path / "pairs" / "pairs_001.pt")  # the run was stopped while making it
    calls.clear()
    again = flow.make_pairs(teacher, args, per_file=100, batch_size=50)
    assert sum(calls) == 100 * 2 * 10  # only the missing 100 pairs: 5 midpoint steps, both guidance halves
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    more = flow.make_pairs(teacher, reflow_args(tmp_path, 320), per_file=100, batch_size=50)  # more --pairs
    assert all(torch.equal(a[:200], b[:200]) for a, b in zip(whole, more)) and len(more[0]) == 320
    with pytest.raises(ValueError, match="holds pairs made with"):
        flow.make_pairs(teacher, reflow_args(tmp_path, 250, seed=4), per_file=100, batch_size=50)  # new noise


@pytest.mark.parametrize("paired", [True, False])
def test_reflow_trains_on_the_teachers_pairing_and_reproduces_a_straight_flow_in_one_step(tmp_path, paired):
    data = flow.make_pairs(StraightFlow(0.15, 0.5), reflow_args(tmp_path, 400))
    if not paired:  # what training on fresh noise would see: the same digits, from other noise
        data = data[:2] + [noise(400, seed=99)]
    student = StraightFlow(0.3, 0.3)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.02)
    args = argparse.Namespace(batch_size=50, amp=False, p_uncond=0.1, log_every=8, epochs=30)
    torch.manual_seed(0)
    losses = [flow.train_epoch(student, optimizer, data, epoch, args)[-1] for epoch in range(1, 31)]
    x0 = noise(20, seed=5)
    one_step = flow.sample(student, 20, steps=1, seed=5)
    many_steps = flow.sample(StraightFlow(0.15, 0.5), 20, steps=50, seed=5)
    if paired:  # the lines from x0 to the teacher's x1 are learned: loss ~ 0, one step lands where 50 do
        assert losses[-1] < 1e-3 and (one_step - many_steps).abs().max() < 0.01
        assert torch.allclose(one_step, 0.15 * x0 + 0.5, atol=0.01)
    else:  # independent noise and digits: the lines cross, and no field follows them all
        assert losses[-1] > 0.05


def test_straightness_is_zero_for_straight_paths_and_measures_the_bend_of_curved_ones():
    trajectory = []
    flow.sample(StraightFlow(0.05, 0.5), 4, steps=8, trajectory=trajectory)
    assert flow.straightness(trajectory) < 1e-10
    model, trajectory = Spy(), []
    flow.sample(model, 4, steps=8, trajectory=trajectory)
    displacement, bend = trajectory[-1] - trajectory[0], 0.0
    for i in range(8):  # u_i = (x_{i+1} - x_i) / dt along the Euler trajectory, against x_end - x_start
        bend += ((displacement - 8 * (trajectory[i + 1] - trajectory[i])) ** 2).mean().item() / 8
    assert flow.straightness(trajectory) == pytest.approx(bend, rel=1e-5) and bend > 0.01


def test_reflow_run_starts_from_the_teacher_and_samples_in_one_step_by_default(mnist, class_run, tmp_path,
                                                                              capsys, monkeypatch):
    out, teacher = tmp_path / "reflow", os.path.join(class_run, "model.pt")
    run_flow("--reflow", teacher, "--pairs", 64, "--epochs", 1, "--batch-size", 32, "--out", out,
             "--device", "cpu", "--log-every", 1, "--logit-normal-t")  # x0 from the pairs, t logit-normal
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.csv", "loss.png", "model.pt", "pairs",
                                       "samples_epoch01.png"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["hidden"] == 8 and ckpt["args"]["lr"] == 1e-3  # the teacher's UNet, fine-tuned
    assert (ckpt["args"]["steps"], ckpt["args"]["guidance"]) == (1, 1.0)  # grids: one call, no guidance
    start = dict(flow.load_checkpoint(teacher).named_parameters())
    moved = [(ckpt["model"][name] - value).abs().max().item() for name, value in start.items()]
    assert 0 < max(moved) < 0.01  # two Adam steps of 1e-3 from the teacher's weights, not from a new UNet
    message = flow_error(capsys, "--reflow", teacher, "--hidden", 16, "--out", tmp_path, "--device", "cpu")
    assert "was trained with --hidden 8, not with --hidden 16: leave it out for --reflow" in message
    calls = []
    monkeypatch.setattr(flow, "sample_grid", lambda model, args, *a: calls.append((args.steps, args.guidance))
                        or Image.new("L", (1, 1)))
    run_flow("--sample-only", "--ckpt", out / "model.pt", "--out", tmp_path / "grid", "--device", "cpu")
    assert calls == [(1, 1.0)]


@pytest.mark.parametrize("teacher,says", [("time", "flow model, time-conditioned"),
                                          ("ddpm", "ddpm model, class-conditioned"),
                                          ("missing", "does not exist"),
                                          ("foreign", "not a flow.py checkpoint")])
def test_reflow_refuses_a_teacher_that_is_not_a_class_flow(mnist, tmp_path, capsys, teacher, says):
    path = str(tmp_path / teacher / "model.pt")
    if teacher in ("time", "ddpm"):
        cond = "time" if teacher == "time" else "class"
        run_flow(*tiny_flow_args(mnist, tmp_path / teacher, "--epochs", 1, "--cond", cond, "--method",
                                 "flow" if teacher == "time" else "ddpm"))
    elif teacher == "foreign":
        os.makedirs(tmp_path / teacher)
        torch.save({"model": {}}, path)
    out = tmp_path / "student"
    message = flow_error(capsys, "--reflow", path, "--out", out, "--data", mnist, "--device", "cpu")
    assert says in message and not os.path.exists(out / "ckpt.pt")


# --- inside the flow: what the network predicts along the way ----------------------


class ThreeImages(torch.nn.Module):
    """The exact flow matching field when the data are three images y_k: x_t = (1 - t) x0 + t y_k makes
    E[x1 | x_t] their average weighted by softmax_k(-|x_t - t y_k|^2 / (2 (1 - t)^2)), and the velocity
    u = (E[x1 | x_t] - x_t) / (1 - t)."""

    def __init__(self, images):
        super().__init__()
        self.images, self.num_classes, self.method = images, 0, "flow"
        self.device_holder = torch.nn.Parameter(torch.zeros(()))  # sample() finds the device here

    def expected_x1(self, x_t, t):  # x_t: B x 1 x 28 x 28, t: B x 1
        distances = (x_t[:, None] - t[:, :, None, None, None] * self.images).square().flatten(2).sum(2)
        weights = (-distances / (2 * (1 - t) ** 2)).softmax(1)  # B x 3
        return torch.einsum("bk,kchw->bchw", weights, self.images)

    def forward(self, x_t, t, c=None):
        return (self.expected_x1(x_t, t) - x_t) / (1 - t[:, :, None, None])


def test_the_guess_of_the_exact_field_is_the_mean_at_first_and_the_nearest_image_at_the_end():
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model, trajectory = ThreeImages(images), []
    x1 = flow.sample(model, 6, steps=50, seed=2, trajectory=trajectory)
    x1_hat = flow.guesses(trajectory)  # read off the Euler steps
    assert x1_hat.shape == (50, 6, 1, 28, 28)
    assert torch.allclose(x1_hat[0], images.mean(0).expand(6, -1, -1, -1), atol=1e-5)  # t = 0: their mean
    for i in (0, 10, 25, 49):  # a second code path: E[x1 | x_t] itself
        t = torch.full((6, 1), i / 50)
        assert torch.allclose(x1_hat[i], model.expected_x1(trajectory[i], t), atol=1e-4), i
    x_t, t = trajectory[49], 49 / 50  # near t = 1: the image nearest to x_t / t, where the sample lands
    nearest = images[(x_t[:, None] / t - images).square().flatten(2).sum(2).argmin(1)]
    assert torch.allclose(x1_hat[49], nearest, atol=1e-5) and torch.allclose(x1, nearest, atol=1e-5)
    assert len(set(nearest.flatten(1).sum(1).tolist())) > 1  # the noises went to different images


def test_the_guess_at_t_0_is_where_one_euler_step_lands():
    torch.manual_seed(0)
    model, trajectory = flow.UNet(8, num_classes=10), []
    labels = torch.tensor([3, 7])
    flow.sample(model, 2, labels, steps=10, guidance=2.0, seed=5, trajectory=trajectory)
    one_step = flow.sample(model, 2, labels, steps=1, guidance=2.0, seed=5)
    assert torch.allclose(flow.guesses(trajectory)[0], one_step, atol=1e-6)


class MeanGuess(torch.nn.Module):
    """The exact field at t = 0 for digits whose means are m_c: u = c . m_c - x_t (time-only: m - x_t), so
    that the guess x1_hat = x0 + u is m_c for the class c, 0 for c = 0 and m without classes."""

    def __init__(self, means):
        super().__init__()
        self.means, self.num_classes, self.method = means, len(means) if len(means) > 1 else 0, "flow"
        self.device_holder = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, c=None):
        guess = self.means[0] if c is None else (c @ self.means.flatten(1)).view(x_t.shape)
        return guess - x_t


@pytest.mark.parametrize("num_classes", [0, 10])
def test_the_guess_from_noise_is_measured_against_the_class_means(mnist, num_classes, capsys):
    images, digits = flow.load_mnist(mnist, "cpu")
    x = images.unsqueeze(1).float() / 255
    m, m_c = x.mean(0), torch.stack([x[digits == k].mean(0) for k in range(10)])
    args = argparse.Namespace(data=mnist, seed=0, guidance=1.0)
    flow.guesses_from_noise(MeanGuess(m_c if num_classes else m[None]), args, "cpu", n=100)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[3:]]
    against = "m_c" if num_classes else "m"
    assert rows[0][1].strip() == against and float(rows[0][2]) == float(rows[0][3]) == 0, rows  # exact
    if num_classes:  # the c = 0 half of this model guesses 0, a mean square of m's own
        assert rows[1][1].strip() == "m"
        assert float(rows[1][2]) == pytest.approx(m.square().mean().item(), abs=1e-4)
    spread = (x - (m_c[digits] if num_classes else m)).square().mean().item()
    reference = ["reference: a training digit", against, f"{spread:.4f}", "-"]
    assert [cell.strip() for cell in rows[-2]] == reference


def test_predictions_draw_the_path_and_the_guesses_of_a_checkpoint(class_run, mnist, tmp_path, capsys):
    out = tmp_path / "inside"
    run_flow("--predictions", "--ckpt", f"{class_run}/ckpt.pt", "--data", mnist, "--out", out, "--steps", 16)
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["path.png", "predictions.png"]
    assert Image.open(out / "path.png").size[1] < Image.open(out / "predictions.png").size[1]  # 4 rows, 10
    assert "t 0:" in printed and "t 0.875:" in printed and "| c = digit, gamma 1 | m_c |" in printed
    ddpm = str(tmp_path / "ddpm.pt")
    settings = {"cond": "time", "hidden": 8, "method": "ddpm"}
    weights = flow.build_unet(settings).state_dict()
    flow.save_checkpoint(ddpm, {"script": "flow.py", "args": settings, "model": weights})
    for argv in (["--ckpt", ddpm], ["--ckpt", f"{class_run}/ckpt.pt", "--solver", "midpoint"],
                 ["--ckpt", f"{class_run}/ckpt.pt", "--steps", 4]):
        message = flow_error(capsys, "--predictions", *argv, "--data", mnist, "--out", out)
        assert "--predictions reads the velocity off Euler steps" in message, argv


# --- sample quality, measured ------------------------------------------------------


def test_frechet_distance_is_zero_for_one_set_and_exact_for_known_gaussians():
    torch.manual_seed(0)
    a = torch.randn(500, 6)
    assert abs(flow.frechet_distance(a, a)) < 1e-8
    # two sets whitened to mean 0 and covariance I exactly, then shifted and scaled per axis:
    # FD = |mu_a - mu_b|^2 + sum_i (sqrt(var_a,i) - sqrt(var_b,i))^2 for diagonal covariances
    white = []
    for z in (torch.randn(400, 3).double(), torch.randn(700, 3).double()):
        chol = torch.linalg.cholesky(torch.cov(z.T))
        white.append(torch.linalg.solve_triangular(chol, (z - z.mean(0)).T, upper=False).T)
    mu_a, mu_b = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.5, -2.0])
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = (mu_a - mu_b).square().sum() + (sd_a - sd_b).square().sum()  # 1.25 + 4 + 0 + 1
    x_a, x_b = white[0] * sd_a.double() + mu_a.double(), white[1] * sd_b.double() + mu_b.double()
    got = flow.frechet_distance(x_a, x_b)
    assert got == pytest.approx(expected.item(), rel=1e-6)


class TopRow(torch.nn.Module):
    def forward(self, x):
        return x[:, 0, 0]  # N x 1 x 28 x 28 -> the top row of pixels, N x 28: the "features"


def pixel_classifier():
    """A stand-in for the MNIST classifier: it predicts digit k when pixel k of the top row is the
    brightest."""
    last = torch.nn.Linear(28, 10, bias=False)
    with torch.no_grad():
        last.weight.copy_(100 * torch.eye(10, 28))
    return torch.nn.Sequential(TopRow(), last)


def test_score_counts_the_digits_recognised_as_asked():
    x = torch.zeros(10, 1, 28, 28)
    x[torch.arange(10), 0, 0, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])] = 1  # the last two look like 0
    accuracy, confidence, features = flow.classify(pixel_classifier(), x, torch.arange(10))
    assert accuracy == pytest.approx(0.8) and confidence > 0.99 and features.shape == (10, 28)
    entropy, _, _ = flow.classify(pixel_classifier(), x)  # 0 three times, 1-7 once each
    p = torch.tensor([0.3] + [0.1] * 7)
    assert entropy == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_evaluate_scores_the_samples_it_draws(class_run, mnist, capsys, monkeypatch):
    monkeypatch.setattr(flow, "load_classifier", lambda root, device: pixel_classifier())
    ckpt = os.path.join(class_run, "model.pt")
    capsys.readouterr()
    run_flow("--evaluate", 20, "--ckpt", ckpt, "--data", mnist, "--solver", "euler,midpoint",
             "--steps", "1,2", "--guidance", 3, "--device", "cpu")
    printed = capsys.readouterr()
    assert printed.err.count("steps, samples: 20/20, eta 0s") == 4  # each row's progress, not in the table
    lines = printed.out.splitlines()
    assert "| accuracy | confidence | FD | real |" in lines[1]
    rows = [line.strip("| ").split(" | ") for line in lines[3:]]
    assert [tuple(r[:4]) for r in rows] == [("euler", "1", "1", "3.0"), ("euler", "2", "2", "3.0"),
                                            ("midpoint", "1", "2", "3.0"), ("midpoint", "2", "4", "3.0")]
    # the second row by a second path: 20 samples (2 of each digit) from the seed 180, scored by hand
    labels, classifier = torch.arange(20) % 10, pixel_classifier()
    x = flow.sample(flow.load_checkpoint(ckpt), 20, labels, steps=2, guidance=3.0, seed=180).clamp(0, 1)
    accuracy, confidence, features = flow.classify(classifier, x, labels)
    digits = lambda limit, train: flow.load_mnist(mnist, "cpu", limit, train)[0].unsqueeze(1) / 255
    real = flow.classify(classifier, digits(None, False))[2]
    fd = flow.frechet_distance(features, real)
    real_fd = flow.frechet_distance(flow.classify(classifier, digits(20, True))[2], real)
    assert rows[1][4:8] == [f"{accuracy:.4f}", f"{confidence:.4f}", f"{fd:.2f}", f"{real_fd:.2f}"]


def test_score_gives_anyones_samples_the_verdict_evaluate_gives_its_own(class_run, mnist, tmp_path,
                                                                         capsys, monkeypatch):
    monkeypatch.setattr(flow, "load_classifier", lambda root, device: pixel_classifier())
    ckpt = os.path.join(class_run, "model.pt")
    run_flow("--evaluate", 20, "--ckpt", ckpt, "--data", mnist, "--steps", 2, "--guidance", 3,
             "--device", "cpu")
    evaluated = capsys.readouterr().out.splitlines()[3].strip("| ").split(" | ")[4:8]
    labels = torch.arange(20) % 10  # the same 20 digits, unclamped, as a learner's code would save them
    x = flow.sample(flow.load_checkpoint(ckpt), 20, labels, steps=2, guidance=3.0, seed=180)
    assert x.min() < 0 or x.max() > 1
    torch.save({"images": x, "labels": labels}, tmp_path / "mine.pt")
    run_flow("--score", tmp_path / "mine.pt", "--data", mnist, "--device", "cpu")
    printed = capsys.readouterr()
    assert "| accuracy | confidence | FD | real |" in printed.out
    assert printed.out.splitlines()[-1].strip("| ").split(" | ") == evaluated
    assert "compare FDs at equal N" in printed.err and "unbalanced" not in printed.err
    torch.save({"images": x, "labels": labels // 2}, tmp_path / "fives.pt")  # digits 0-4 only
    run_flow("--score", tmp_path / "fives.pt", "--data", mnist, "--device", "cpu")
    assert "the labels are unbalanced ([4, 4, 4, 4, 4, 0, 0, 0, 0, 0])" in capsys.readouterr().err
    torch.save(x, tmp_path / "unlabelled.pt")  # a time-only model's: the entropy of the digits drawn
    run_flow("--score", tmp_path / "unlabelled.pt", "--data", mnist, "--device", "cpu")
    assert "| entropy | confidence | FD | real |" in capsys.readouterr().out
    torch.save(20 * noise(20, seed=0), tmp_path / "broken.pt")  # a broken sampler's: scored, not refused
    run_flow("--score", tmp_path / "broken.pt", "--data", mnist, "--device", "cpu")
    assert "| entropy | confidence | FD | real |" in capsys.readouterr().out


@pytest.mark.parametrize("make,says", [
    (lambda x: x * 2 - 1, "as if in [-1, 1]: map x to (x + 1) / 2"),
    (lambda x: x * 255, "as if in 0-255: divide them by 255"),
    (lambda x: (x - 0.1307) / 0.3081, "as if normalised by MNIST's mean and std"),
    (lambda x: 1 - x, "as if black digits on white: map x to 1 - x"),
    (lambda x: x[:, 0], "holds 30 x 28 x 28, not N x 1 x 28 x 28"),
    (lambda x: x[:1], "N >= 2"),
    (lambda x: {"pictures": x}, "holds a dict without 'images'"),
    (lambda x: [x], "holds list"),
    (lambda x: {"images": x, "labels": torch.arange(30) + 5}, "30 whole numbers from 0 to 9"),
    (lambda x: {"images": x, "labels": torch.zeros(30)}, "30 whole numbers from 0 to 9"),
])
def test_score_refuses_the_wrong_conventions_by_name(tmp_path, capsys, make, says):
    digits = torch.zeros(30, 1, 28, 28)
    digits[:, :, 8:20, 12:16] = torch.rand(30, 1, 12, 4)  # white strokes on a black background
    torch.save(make(digits), tmp_path / "theirs.pt")
    assert says in flow_error(capsys, "--score", tmp_path / "theirs.pt")


def test_score_refuses_files_that_are_not_saved_tensors(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("my samples")
    assert "not a file of tensors from torch.save" in flow_error(capsys, "--score", tmp_path / "notes.pt")
    assert "does not exist" in flow_error(capsys, "--score", tmp_path / "missing.pt")


def test_evaluate_with_a_guide_counts_its_calls_and_a_guide_like_the_model_changes_nothing(
        mnist, class_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(flow, "load_classifier", lambda root, device: pixel_classifier())
    out = str(tmp_path / "time")
    run_flow(*tiny_flow_args(mnist, out, "--epochs", 1, "--cond", "time"))
    ckpt, rows = os.path.join(out, "model.pt"), []
    for extra in ([], ["--autoguide", ckpt, "--guidance", "2"]):  # u_guide + 2 (u - u_guide) = u
        capsys.readouterr()
        run_flow("--evaluate", 20, "--ckpt", ckpt, "--data", mnist, "--steps", 2, "--device", "cpu", *extra)
        rows.append(capsys.readouterr().out.splitlines()[-1].strip("| ").split(" | "))
    assert rows[0][:4] == ["euler", "2", "2", "-"] and rows[1][:4] == ["euler", "2", "4", "2.0"]
    assert rows[1][4:8] == rows[0][4:8]
    message = flow_error(capsys, "--evaluate", 20, "--ckpt", ckpt, "--autoguide",
                         os.path.join(class_run, "model.pt"), "--data", mnist)
    assert "--autoguide needs a flow time model" in message


@pytest.mark.parametrize("run, solver, steps, guidance", [("flow_class", "midpoint", 10, 5.0),
                                                           ("ddpm_class", "ddim", 10, 5.0),
                                                           ("flow_class_reflow", "euler", 1, 1.0)])
def test_committed_class_weights_draw_the_digits_asked_for(mnist, run, solver, steps, guidance):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", run, "model.pt")
    assert os.path.getsize(path) <= 5 * 2 ** 20
    labels = torch.arange(10).repeat(3)
    model = flow.load_checkpoint(path)
    x = flow.sample(model, 30, labels, steps, guidance, step_fn=flow.solver_step(model, solver)).clamp(0, 1)
    images, digits = flow.load_mnist(mnist, "cpu", 2000, train=False)
    means = torch.stack([images[digits == k].float().mean(0) / 255 for k in range(10)])  # 10 x 28 x 28
    nearest = torch.cdist(x.flatten(1), means.flatten(1)).argmin(1)  # about 80% right on real test digits
    assert (nearest == labels).float().mean() >= 0.7


@pytest.mark.parametrize("run, guide", [("flow_time", None), ("flow_time_better", "flow_time_guide")])
def test_committed_time_weights_draw_varied_digits(mnist, run, guide):
    path = lambda name: os.path.join(HERE, "samples", name, "model.pt")
    assert all(os.path.getsize(path(name)) <= 5 * 2 ** 20 for name in filter(None, (run, guide)))
    model, guide = flow.load_checkpoint(path(run)), guide and flow.load_checkpoint(path(guide))
    net, gamma = flow.guided(model, guide, 2.0)  # gamma 2: if guided
    x = flow.sample(net, 30, steps=10, guidance=gamma).clamp(0, 1).flatten(1)
    images, digits = flow.load_mnist(mnist, "cpu", 2000, train=False)
    means = torch.stack([images[digits == k].float().mean(0) / 255 for k in range(10)]).flatten(1)
    real = torch.cdist(images[:300].float().flatten(1) / 255, means).min(1).values.mean()
    distances = torch.cdist(x, means)  # to the ten class-mean images: real digits 6.0 on average, noise 13
    assert distances.min(1).values.mean() <= 1.25 * real and len(set(distances.argmin(1).tolist())) >= 7


# --- the flow as a density ---------------------------------------------------------


class LinearField(torch.nn.Module):
    """u(x, t) = A x on the 784 pixels: from x0 ~ N(0, I), x1 = expm(A) x0 ~ N(0, expm(A) expm(A)^T)."""
    num_classes = 0

    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, x, t, c=None):
        return (x.flatten(1) @ self.A.T).view_as(x)


def test_a_dense_linear_field_keeps_a_gaussian_gaussian():
    torch.manual_seed(0)
    A = 0.7 * torch.randn(784, 784) / 28  # dense and not symmetric: Hutchinson's estimate is not exact
    M = torch.linalg.matrix_exp(A).double()
    x1 = (torch.randn(64, 784).double() @ M.T).float().view(64, 1, 28, 28)
    p1 = torch.distributions.MultivariateNormal(torch.zeros(784).double(), M @ M.T)
    exact = p1.log_prob(x1.flatten(1).double()).float()  # the answer by a second path
    probe = torch.randint(0, 2, x1.shape).float() * 2 - 1
    e = probe.flatten(1)
    errors = []
    for steps in (10, 20, 40):
        base, integral, x0 = flow.log_likelihood(LinearField(A), x1, steps, "midpoint", probe=probe)
        # with one probe the divergence is e^T A e all along the path, not tr A: known image by image
        errors.append((base - integral - (exact + A.trace() - ((e @ A) * e).sum(1))).abs().max().item())
    assert errors[-1] < 0.02 and 3 < errors[0] / errors[1] < 5 and 3 < errors[1] / errors[2] < 5  # order 2
    hutchinson = base - integral - exact  # unbiased: zero on average, give or take its standard error
    assert hutchinson.mean().abs() < 4 * hutchinson.std() / 8
    _, div = flow.divergence(LinearField(A), x1[:2], 0.5)  # no probe: the exact trace, 784 products
    assert div.tolist() == pytest.approx([A.trace().item()] * 2, abs=1e-3)


def test_the_zero_field_leaves_the_gaussian_it_starts_from():
    x1 = noise(3, seed=0)
    zero = LinearField(torch.zeros(784, 784))
    base, integral, x0 = flow.log_likelihood(zero, x1, 5, "euler", probe=torch.ones_like(x1))
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(x1).flatten(1).sum(1)
    assert torch.equal(x0, x1) and integral.abs().max() == 0
    assert base.tolist() == pytest.approx(normal.tolist())
    # N(0, I) at its centre: log p = -392 ln(2 pi), far from 0: bits/dim = 8 + log2(2 pi) / 2 checks the base
    base, integral, _ = flow.log_likelihood(zero, torch.zeros(1, 1, 28, 28), 5, "euler")
    assert flow.bits_per_dim(base - integral).item() == pytest.approx(8 + math.log2(2 * math.pi) / 2)


class ToUniform(torch.nn.Module):
    """The field that carries N(0, 1) to U(0, 1) on every pixel along x_t = (1 - t) z + t Phi(z): the z that
    reached x is found by bisection, then a Newton step gives autograd dz/dx."""
    num_classes = 0

    def forward(self, x, t, c=None):
        t, normal = t.view(-1, 1, 1, 1), torch.distributions.Normal(0.0, 1.0)
        path = lambda z: (1 - t) * z + t * normal.cdf(z)
        with torch.no_grad():
            low, high = torch.full_like(x, -12.0), torch.full_like(x, 12.0)
            for _ in range(40):
                middle = (low + high) / 2
                below = path(middle) < x
                low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        z = (low + high) / 2
        z = z - (path(z) - x) / (1 - t + t * normal.log_prob(z).exp())
        return normal.cdf(z) - z


def test_a_uniform_density_on_the_unit_cube_scores_8_bits_per_pixel():
    assert flow.bits_per_dim(torch.tensor(0.0)) == 8  # log p = 0: 256 equal bins of 1/256
    x1 = 0.02 + 0.96 * torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    probe = torch.randint(0, 2, x1.shape).float() * 2 - 1  # the field is pixel by pixel: Hutchinson is exact
    base, integral, x0 = flow.log_likelihood(ToUniform(), x1, 40, "midpoint", probe=probe)
    normal = torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(normal.cdf(x0), x1, atol=1e-4)  # back to the z that Phi sends to x1
    assert flow.bits_per_dim(base - integral).tolist() == pytest.approx([8, 8], abs=1e-3)


def test_likelihood_scores_dequantized_test_digits_by_both_halves_of_a_class_model(class_run, mnist, capsys):
    ckpt = os.path.join(class_run, "model.pt")
    capsys.readouterr()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as on CUDA
    run_flow("--likelihood", 3, "--ckpt", ckpt, "--data", mnist, "--steps", 2, "--device", "cpu")
    assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)  # fp32 throughout
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    printed = capsys.readouterr()
    assert "p(x given c), c = its digit, test digits: 3/3, eta 0s" in printed.err
    assert "trained on pixel / 255, not --dequantize" in printed.err  # class_run was
    lines = printed.out.splitlines()
    assert "midpoint, 2 steps" in lines[0] and "NFE 4" in lines[0]
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:] for line in lines[3:]}
    assert list(rows) == ["p(x), c = 0", "p(x given c), c = its digit"]
    # a second path: the same three digits, u and probes from the seed 180, the UNet called by hand
    images, labels = flow.load_mnist(mnist, "cpu", 3, train=False)
    generator = torch.Generator().manual_seed(180)
    x1 = (images.unsqueeze(1) + torch.rand(3, 1, 28, 28, generator=generator)) / 256
    probe = (torch.randint(0, 2, x1.shape, generator=generator) * 2 - 1).float()
    model = flow.load_checkpoint(ckpt)
    for c, row in zip((torch.zeros(3, 10), torch.nn.functional.one_hot(labels, 10).float()), rows.values()):
        base, integral, _ = flow.log_likelihood(model, x1, 2, "midpoint", c, probe)
        bits = flow.bits_per_dim(base - integral)
        per_pixel = lambda nats: f"{nats.mean() / (784 * math.log(2)):.4f}"
        error = f"{bits.std() / 3 ** 0.5:.4f}"
        assert row[:4] == [f"{bits.mean():.4f}", error, per_pixel(-base), per_pixel(integral)]


def test_likelihood_refuses_what_has_no_density(mnist, class_run, tmp_path, capsys):
    ddpm = str(tmp_path / "ddpm.pt")
    settings = {"cond": "time", "hidden": 8, "method": "ddpm"}
    weights = flow.build_unet(settings).state_dict()
    flow.save_checkpoint(ddpm, {"script": "flow.py", "args": settings, "model": weights})
    ckpt = os.path.join(class_run, "model.pt")
    for argv, says in [(["--ckpt", ddpm], "--likelihood needs a flow model"),
                       (["--ckpt", tmp_path / "missing.pt"], "does not exist"),
                       (["--ckpt", ckpt, "--guidance", 2], "density of the unguided field"),
                       (["--ckpt", ckpt, "--steps", "10,20"], "density of the unguided field"),
                       (["--ckpt", ckpt, "--solver", "ddim"], "takes --solver euler or midpoint, not ddim"),
                       (["--ckpt", ckpt, "--likelihood", 10001], "the test split has 10,000 digits")]:
        assert says in flow_error(capsys, "--likelihood", 5, "--data", mnist, *argv), argv
    assert "invalid positive int value" in flow_error(capsys, "--likelihood", 0, "--ckpt", ckpt)


def test_dequantize_trains_on_each_pixel_plus_fresh_uniform_noise_over_256():
    seen = []
    loss = flow.dequantized(lambda model, x1, *rest: seen.append(x1) or x1.mean())
    pixels = torch.randint(0, 256, (4, 1, 28, 28)).float()
    for _ in range(2):
        loss(None, pixels / 255, None, 0.1)
    for x1 in seen:
        assert torch.equal((x1 * 256).floor(), pixels) and 0.4 < (x1 * 256 - pixels).mean() < 0.6
    assert not torch.equal(seen[0], seen[1])  # u drawn afresh for each batch



# --- sweeps and sampling from a checkpoint -----------------------------------------


def test_sample_only_writes_to_runs_and_leaves_the_checkpoint_folder_alone(class_run, tmp_path, capsys,
                                                                           monkeypatch):
    before = sorted(os.listdir(class_run))
    monkeypatch.chdir(tmp_path)
    run_flow("--sample-only", "--ckpt", os.path.join(class_run, "model.pt"), "--steps", 2,
             "--solver", "midpoint", "--amp", "--gif", "--device", "cpu")
    out = tmp_path / "runs" / "flow_class"
    assert str(out / "samples.png").endswith(capsys.readouterr().out.split()[1])
    assert sorted(os.listdir(out)) == ["samples.png", "sampling.gif"]
    assert Image.open(out / "samples.png").size == (604, 244)
    assert Image.open(out / "sampling.gif").n_frames == 2 + 1
    assert sorted(os.listdir(class_run)) == before


def test_guidance_on_a_time_only_model_needs_a_guide(mnist, tmp_path, capsys):
    time_run = str(tmp_path / "time")
    run_flow(*tiny_flow_args(mnist, time_run, "--epochs", 1, "--cond", "time"))
    ckpt = os.path.join(time_run, "model.pt")
    message = flow_error(capsys, "--sample-only", "--ckpt", ckpt, "--guidance", "1,5")
    assert "time-only, with no class to guide by: --guidance needs --autoguide" in message


def test_sample_only_sweep_writes_one_row_per_value(class_run, tmp_path):
    run_flow("--sample-only", "--ckpt", os.path.join(class_run, "ckpt.pt"), "--steps", 2,
             "--guidance", "0,1,5", "--out", tmp_path, "--device", "cpu")
    assert os.listdir(tmp_path) == ["sweep_guidance.png"]
    figure = Image.open(tmp_path / "sweep_guidance.png")
    assert figure.height == 8 + 3 * 2 * 32 + 8  # 3 rows of 28-pixel digits with 2-pixel borders, 2x, margins


# --- speed -------------------------------------------------------------------------


def test_benchmark_reports_speed_and_writes_nothing(mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flow.main(["--benchmark", "--data", mnist, "--hidden", "8", "--limit", "256", "--batch-size", "8",
               "--steps", "2", "--device", "cpu"])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("benchmark on cpu") and "images/s" in line and " s per " in line
    assert os.listdir(tmp_path) == []


# --- bad input: one clear sentence, a non-zero exit, nothing lost ------------------


@pytest.mark.parametrize("argv,says", [
    (["--cond", "pixel"], "invalid choice"),
    (["--epochs", "0"], "invalid positive int value: '0'"),
    (["--batch-size", "-3"], "invalid positive int value: '-3'"),
    (["--p-uncond", "1.5"], "--p-uncond"),
    (["--device", "tpu"], "invalid choice"),
    (["--sample-only", "--guidance", "1,5", "--gif"], "--gif animates one grid"),
    (["--evaluate", "10", "--gif"], "--gif animates one grid"),
    (["--method", "ddpm", "--logit-normal-t"], "--logit-normal-t is for flow matching"),
    (["--autoguide", "guide.pt"], "--autoguide is for --sample-only and --evaluate"),
    (["--reflow", "teacher.pt", "--method", "ddpm"], "--reflow trains a flow model"),
    (["--reflow", "teacher.pt", "--evaluate", "10"], "--reflow trains a flow model"),
    (["--predictions", "--steps", "10,20"], "--predictions draws one figure"),
    (["--predictions", "--gif"], "--gif animates one grid"),
    (["--likelihood", "5", "--evaluate", "5"], "not allowed with argument --likelihood"),
    (["--benchmark", "--sample-only"], "not allowed with argument --benchmark"),
    (["--score", "mine.pt", "--gif"], "--gif animates one grid"),
    (["--reflow", "teacher.pt", "--limit", "500"], "--reflow trains a flow model on --pairs pairs"),
    (["--reflow", "teacher.pt", "--benchmark"], "not with --method ddpm, --limit, --benchmark"),
    (["--reflow", "teacher.pt", "--pairs", "10"], "--pairs 10 is less than --batch-size 64: raise --pairs"),
])
def test_bad_flags_are_refused(capsys, argv, says):
    assert says in flow_error(capsys, *argv)


@pytest.mark.parametrize("value", ["1,,x", "fast", ""])
def test_bad_lists_are_refused(capsys, value):
    assert "comma-separated" in flow_error(capsys, "--sample-only", "--guidance", value)


def test_lists_are_refused_for_training(capsys):
    assert "--sample-only and --evaluate" in flow_error(capsys, "--steps", "10,20")


def test_unwritable_out_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert "cannot write to --out" in flow_error(capsys, "--out", tmp_path / "file" / "run")


def test_an_existing_run_is_not_overwritten(mnist, class_run, capsys):
    before = open(os.path.join(class_run, "ckpt.pt"), "rb").read()
    assert "--resume" in flow_error(capsys, *tiny_flow_args(mnist, class_run, "--epochs", 1))
    assert open(os.path.join(class_run, "ckpt.pt"), "rb").read() == before


def test_broken_checkpoints_are_refused(mnist, class_run, tmp_path, capsys):
    good = os.path.join(class_run, "ckpt.pt")
    truncated, garbage, tensor = (str(tmp_path / n) for n in ("truncated.pt", "garbage.pt", "tensor.pt"))
    open(truncated, "wb").write(open(good, "rb").read()[:5000])
    open(garbage, "wb").write(b"hello, not a checkpoint")
    torch.save(torch.zeros(3), tensor)
    for path in (truncated, garbage):
        assert "not a readable checkpoint" in flow_error(capsys, "--sample-only", "--ckpt", path)
    assert "not a flow.py checkpoint" in flow_error(capsys, "--sample-only", "--ckpt", tensor)
    assert "does not exist" in flow_error(capsys, "--sample-only", "--ckpt", tmp_path / "missing.pt")
    other = str(tmp_path / "other")
    message = flow_error(capsys, *tiny_flow_args(mnist, other, "--epochs", 1, "--cond", "time",
                                                 "--resume", good))
    assert "--cond class" in message
    message = flow_error(capsys, *tiny_flow_args(mnist, other, "--epochs", 1, "--hidden", 16,
                                                 "--resume", good))
    assert "--hidden 8" in message
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        flow.load_checkpoint(truncated)


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(mnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    message = flow_error(capsys, *tiny_flow_args(mnist, out, "--epochs", 1, "--lr", 1e30))
    assert "at step" in message and "no checkpoint" in message
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))

    run_flow(*tiny_flow_args(mnist, out + "2", "--epochs", 2, "--sample-epochs", "1"))
    ckpt_path = os.path.join(out + "2", "ckpt.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["epoch"] = 1  # an epoch-1 checkpoint whose weights have gone bad
    ckpt["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    flow.save_checkpoint(ckpt_path, ckpt)
    before = open(ckpt_path, "rb").read()
    message = flow_error(capsys, *tiny_flow_args(mnist, out + "2", "--epochs", 2, "--sample-epochs", "1",
                                                 "--resume", ckpt_path))
    assert "at step 5" in message and "checkpoint of epoch 1" in message and "is kept" in message
    assert open(ckpt_path, "rb").read() == before


# --- each script stands alone ------------------------------------------------------


@pytest.mark.parametrize("script, out", [("denoise.py", "denoise"), ("flow.py", "flow_class")])
def test_each_script_runs_copied_alone_into_an_empty_folder(script, out, mnist, tmp_path):
    shutil.copy(os.path.join(HERE, script), tmp_path)
    argv = ["--data", mnist, "--hidden", "8", "--limit", "64", "--batch-size", "32", "--epochs", "1",
            "--device", "cpu"]
    argv += ["--steps", "2"] if script == "flow.py" else []
    result = subprocess.run([sys.executable, script, *argv], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([script, "runs"])  # a run's outputs go to runs/ by default
    assert "ckpt.pt" in os.listdir(tmp_path / "runs" / out)


def test_the_shared_pieces_are_identical_in_both_scripts():
    import inspect
    for name in ("bn_gelu", "ConvBlock", "DownBlock", "UpBlock", "load_mnist", "to_float", "pick_device",
                 "amp_problem", "autocast", "to_device", "random_streams", "restore_random_streams",
                 "grid_image", "figure", "canvas", "plot_loss", "read_checkpoint"):
        assert inspect.getsource(getattr(flow, name)) == inspect.getsource(getattr(denoise, name)), name


def test_the_readmes_name_only_files_and_flags_that_exist(capsys):
    import re
    lesson, notebook = (open(os.path.join(HERE, p)).read() for p in ("README.md", "samples/README.md"))
    linked = re.findall(r"\]\(((?:samples/)?[\w/.-]+\.(?:png|gif|md))\)", lesson + notebook)
    for path in linked:  # the notebook's links are relative to samples/
        assert any(os.path.exists(os.path.join(HERE, root, path)) for root in ("", "samples")), path
    for folder in os.listdir(os.path.join(HERE, "samples")):  # each folder with the command that made it
        if os.path.isdir(os.path.join(HERE, "samples", folder)):
            assert re.search(rf"(--out|cp \S+) samples/{folder}\b", notebook), folder
    helps = []
    for script in (flow, denoise):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        helps.append(capsys.readouterr().out)
    for flag in set(re.findall(r"`(--[a-z-]+)", lesson)):
        assert any(flag in text for text in helps), flag


# --- on a GPU or a Mac: run where one is present, skipped elsewhere ------------------

PRESENT = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
DEVICES = [pytest.param(name, marks=pytest.mark.skipif(not present, reason=f"no {name} device here"))
           for name, present in PRESENT.items()]


@pytest.mark.parametrize("device", DEVICES)
def test_a_tiny_run_trains_and_resumes_on_the_device(mnist, tmp_path, monkeypatch, device):
    amp = [] if flow.amp_problem(torch.device(device)) else ["--amp"]
    args = ("--epochs", 2, "--sample-epochs", "1", "--device", device, "--ema", 0.9, *amp)
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    run_flow(*tiny_flow_args(mnist, whole, *args))

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(flow, "sample_grid", crash)
    with pytest.raises(KeyboardInterrupt):
        run_flow(*tiny_flow_args(mnist, broken, *args))
    monkeypatch.undo()
    run_flow("--resume", os.path.join(broken, "ckpt.pt"), "--device", device, "--data", mnist)
    a, b = (torch.load(os.path.join(run, "ckpt.pt"), weights_only=True) for run in (whole, broken))
    assert f"rng_{device}" in b  # the device's own random stream, restored on resume
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-3)  # the GPU's kernels may vary in the last bits
    assert os.path.exists(os.path.join(broken, "samples_epoch02.png"))


@pytest.mark.parametrize("device", DEVICES)
def test_the_shipped_weights_draw_the_cpus_digits_on_the_device(device):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on both
    path, labels = os.path.join(HERE, "samples", "flow_class", "model.pt"), torch.arange(20) % 10
    digits = [flow.sample(flow.load_checkpoint(path, where), 20, labels, steps=5, guidance=2.0, seed=180)
              for where in ("cpu", device)]
    digits[1] = digits[1].cpu()
    assert (digits[0] - digits[1]).abs().max() < 0.01  # the seed's noise is the same: float error alone
    weight = flow.load_checkpoint(path, device).down1[0][0].weight
    memory = torch.contiguous_format if device == "mps" else torch.channels_last  # BatchNorm's MPS bug
    assert weight.is_contiguous(memory_format=memory)
