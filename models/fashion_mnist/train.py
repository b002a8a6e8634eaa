"""Train the example Fashion-MNIST ResNet and export it to ONNX (dev-only; needs torch).

The committed ``fmnist_resnet.onnx`` (BatchNormalization nodes kept, in
inference form) and ``fmnist_resnet_fused.onnx`` (BN folded into Conv, the
exporter's default) were made by::

    python models/fashion_mnist/train.py --out-dir models/fashion_mnist

in the torch virtual environment created by ``models/build_all.sh``. The
network is a small CIFAR-style ResNet: a 3x3 stem (16 channels), three stages
of two basic blocks (16/32/64 channels, stride 1/2/2, a 1x1 conv + BN on the
shortcut where the shape changes), global average pooling and a Linear layer
to 10 classes: 15 BatchNormalization layers, about 0.17 M parameters.

Everything is seeded and runs on the CPU with a fixed thread count, so a
re-run on the same machine and torch version reproduces the weights; across
machines the float rounding of the convolutions may differ slightly.

After export both ONNX models are checked with ONNX Runtime (graph
optimisations disabled) on the 10,000 test images: their top-1 accuracy is
printed next to torch's and must match it, and the logits must agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from data import INPUT_NAME, load_split, normalise
from torch import nn
from torch.nn import functional as F

OUTPUT_NAME = "logits"
OPSET = 17


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class FashionResNet(nn.Module):
    """Stem + 3 stages x ``blocks`` basic blocks + global average pool + Linear."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            layers = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, width, stride))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as
        # the identity, which makes short training schedules markedly better.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``pad`` pixels (zero-padded
    in normalised space, i.e. filled with the normalised value of a black pixel)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    background = (0.0 - 0.2860) / 0.3530
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Logits of ``model`` (eval mode) on ``x``, as float32 NumPy."""
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def onnx_logits(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of an ONNX model under ONNX Runtime with graph optimisations off
    (so that ORT does not fold BN itself: we check the exported graph as is)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    )


def export(model: nn.Module, path: Path, keep_bn: bool) -> None:
    """Export with a dynamic batch axis. ``keep_bn``: BN nodes stay (inference
    form, unfolded constants); otherwise the exporter's default (BN folded)."""
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    kwargs: dict[str, object] = {}
    if keep_bn:
        kwargs = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    # The TorchScript exporter is used on purpose (dynamo=False): it keeps BN as
    # BatchNormalization nodes under PRESERVE and folds them by default.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, dynamo=False, **kwargs,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if keep_bn:
        bad = [n.name for n in bns if len(n.output) != 1 or any(
            a.name == "training_mode" and a.i != 0 for a in n.attribute)]
        if not bns or bad:
            raise RuntimeError(f"{path}: BN nodes missing or in training form: {bad}")
    elif bns:
        raise RuntimeError(f"{path}: expected BN folded into Conv, found {len(bns)} BN nodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--root", type=Path, default=None, help="Fashion-MNIST IDX folder")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    train_img, train_lbl = load_split("train", args.root)
    test_img, test_lbl = load_split("test", args.root)
    x_train, y_train = torch.from_numpy(normalise(train_img)), torch.from_numpy(train_lbl)
    x_test = torch.from_numpy(normalise(test_img))

    model = FashionResNet()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15,
    )

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb = augment(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        acc = float((predict(model, x_test).argmax(1) == test_lbl).mean())
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / seen:.4f}, "
              f"test top-1 {100 * acc:.2f}%, {time.time() - t0:.0f} s", flush=True)
    train_seconds = time.time() - t0

    torch_logits = predict(model, x_test)
    torch_top1 = float((torch_logits.argmax(1) == test_lbl).mean())
    results: dict[str, object] = {"torch_top1": torch_top1}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for keep_bn, name in ((True, "fmnist_resnet.onnx"), (False, "fmnist_resnet_fused.onnx")):
        path = args.out_dir / name
        export(model, path, keep_bn)
        logits = onnx_logits(path, x_test.numpy())
        top1 = float((logits.argmax(1) == test_lbl).mean())
        diff = float(np.abs(logits - torch_logits).max())
        agree = float((logits.argmax(1) == torch_logits.argmax(1)).mean())
        results[name] = {
            "onnx_top1": top1, "max_abs_logit_diff_vs_torch": diff,
            "argmax_agreement_vs_torch": agree, "bytes": path.stat().st_size,
        }
        print(f"{name}: ONNX Runtime top-1 {100 * top1:.2f}% (torch {100 * torch_top1:.2f}%), "
              f"max |logit diff| {diff:.2e}, argmax agreement {agree:.4f}, "
              f"{path.stat().st_size} bytes")
        if agree < 0.999 or diff > 1e-3:
            # 1e-3: logits are O(10); float32 reassociation between torch and ORT
            # (and BN folding) moves them by ~1e-5. Anything near 1e-3 is a bug.
            print(f"error: {name} does not reproduce the torch model", file=sys.stderr)
            return 1

    record = {
        "command": "python models/fashion_mnist/train.py " + " ".join(argv or sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_samples": len(test_lbl),
        **results,
    }
    (args.out_dir / "fmnist_resnet.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained in {train_seconds:.0f} s; wrote {args.out_dir}/fmnist_resnet*.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
