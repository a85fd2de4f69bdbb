"""Command line: python -m dla_fused {demo,train,info,params}.

  demo    dla34 trained side by side, reference ops vs fused ops, on generated data: a table of
          images/s, memory, final loss and accuracy, and a plot (the README's first command)
  train   the training entry point (python -m dla_fused train --help)
  info    which backends were built, which run where, and which is selected
  params  parameter counts of every model
"""
import argparse
import json
import os
import sys
import time


def _saved_bytes(model, images, target, cfg) -> int:
    """Bytes autograd keeps for backward during one training step, beyond the inputs and the
    parameters (alive anyway), as the benchmarks count them."""
    from .profiling import saved_bytes
    from .train import _loss

    def step():
        _loss(cfg, model(images), target)[0].backward()
    count = saved_bytes(step, exclude=[images, *model.parameters()])
    model.zero_grad(set_to_none=True)
    return count


def demo(args) -> int:
    import torch
    from . import backend, create_model, parameter_table
    from .models import create_model as create_reference
    from .train import TrainConfig, train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("Parameter counts (original layout / timm layout):")
    for row in parameter_table():
        if row.name == "dla34":
            print(f"  {row.name:10s} {row.original:>12,d} / {row.timm:,d}")
    seg = sum(p.numel() for p in create_reference("dla34up", num_classes=19).parameters())
    print(f"  {'dla34up':10s} {seg:>12,d} (19 classes)")
    print()
    backend.backend_info()
    print()
    gpu = device == "cuda"
    # CPU: 64 px images, 16 per batch, 100 steps: about 30 s per model on 2 cores
    steps = args.steps or (200 if gpu else 100)
    batch = 64 if gpu else 16
    common = dict(model="dla34", task="cls", num_classes=4, image_size=128 if gpu else 64, batch_size=batch,
                  num_samples=steps * batch, epochs=1, lr=0.05, seed=0, log_every=5,
                  amp="bf16" if gpu else None, channels_last=gpu, quiet=args.quiet)
    results = {}
    for label, fused in (("reference", False), ("fused", True)):
        cfg = TrainConfig(**common, fused=fused, out=os.path.join(args.out, label))
        print(f"training dla34 with {label} ops: {steps} steps of {cfg.batch_size} images "
              f"{cfg.image_size}x{cfg.image_size} on {device}" + (", bf16, channels_last" if gpu else ""),
              flush=True)
        start = time.perf_counter()
        summary = train(cfg)
        summary["wall_s"] = time.perf_counter() - start
        if not gpu:  # CPU has no allocator statistics: report what backward keeps alive instead
            from .data import ShapesDataset
            data = ShapesDataset(cfg.batch_size, cfg.image_size, cfg.num_classes, "cls", seed=1)
            images = torch.stack([data[i][0] for i in range(cfg.batch_size)])
            target = torch.tensor([data[i][1] for i in range(cfg.batch_size)])
            torch.manual_seed(0)
            model = create_model("dla34", num_classes=data.num_targets, fused=fused).train()
            summary["saved_bytes"] = _saved_bytes(model, images, target, cfg)
        results[label] = summary
    ref, fus = results["reference"], results["fused"]
    memory_name = "peak memory (MiB)" if gpu else "saved for backward (MiB)"
    memory_key = "peak_memory_bytes" if gpu else "saved_bytes"
    rows = [("images/s", f"{ref['images_per_s']:.1f}", f"{fus['images_per_s']:.1f}",
             f"{fus['images_per_s'] / ref['images_per_s']:.2f}x"),
            (memory_name, f"{ref[memory_key] / 2**20:.1f}", f"{fus[memory_key] / 2**20:.1f}",
             f"{fus[memory_key] / ref[memory_key]:.2f}x"),
            ("final loss", f"{ref['final_loss']:.4f}", f"{fus['final_loss']:.4f}", ""),
            ("accuracy", f"{ref['metric']:.3f}", f"{fus['metric']:.3f}", ""),
            ("wall time (s)", f"{ref['wall_s']:.1f}", f"{fus['wall_s']:.1f}", "")]
    print()
    print(f"dla34, {steps} training steps on {device}: reference vs fused")
    print(f"{'':28s}{'reference':>12s}{'fused':>12s}{'fused/ref':>12s}")
    for name, a, b, ratio in rows:
        print(f"{name:28s}{a:>12s}{b:>12s}{ratio:>12s}")
    unfused = [op for op in backend.OPS if backend.resolve(torch.device(device), op) == "eager"]
    if unfused:
        print(f"(the fused model ran {', '.join(unfused)} unfused, as PyTorch's own ops: backend "
              f"{backend.get_backend()!r} on {device}; `python -m dla_fused info` says why)")
    _side_by_side_plot(results, os.path.join(args.out, "demo.png"))
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nplot: {os.path.join(args.out, 'demo.png')}, figures: {os.path.join(args.out, 'demo.json')}")
    return 0


def _side_by_side_plot(results, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, summary in results.items():
        steps, losses = [], []
        with open(summary["log"]) as f:
            for line in f:
                row = json.loads(line)
                if row["kind"] == "step":
                    steps.append(row["global_step"])
                    losses.append(row["loss"])
        ax.plot(steps, losses, label=f"{label} ({summary['images_per_s']:.0f} img/s)")
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.legend()
    ax.set_title("dla34 on generated shapes: reference vs fused ops")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def params(_args) -> int:
    from .models import parameter_table
    print(f"{'model':12s}{'original':>14s}{'timm':>14s}")
    for row in parameter_table():
        print(f"{row.name:12s}{row.original:>14,d}{row.timm:>14,d}")
    return 0


def info(_args) -> int:
    from . import backend
    backend.backend_info()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        from .train import main as train_main
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dla_fused", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="reference vs fused dla34 training, side by side")
    d.add_argument("--steps", type=int, default=None, help="training steps per model (default: 200 on a GPU, "
                   "100 on the CPU)")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("train", help="train a model (see: python -m dla_fused train --help)")
    sub.add_parser("info", help="backends built and selected")
    sub.add_parser("params", help="parameter counts")
    args = parser.parse_args(argv)
    return {"demo": demo, "info": info, "params": params}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
