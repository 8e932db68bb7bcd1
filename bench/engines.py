"""The inference engines side by side, in this process with one thread, interleaved rounds:

- the forward pass alone, batch 1: digit_cnn (the served checkpoint), torchvision's
  mobilenet_v3_small and resnet18 (random weights, channels-last as the service builds them),
  eager PyTorch against ONNX Runtime running the service's own export (service.engines);
- the model's calls for one digit as the predict view makes them (``prepare`` + ``classify``),
  with either engine;
- what this core can do at all: each forward pass's floating-point operations (torch's
  FlopCounterMode) over its time, beside the fastest fp32 rate measured on the core (square
  ``torch.mm`` products, one thread, or any of the forward passes). An engine running a network
  at that rate throughout is the fastest one can hope for: eager PyTorch's time over that bounds
  the speed-up any engine can give on this machine.
"""

import statistics
import time
from dataclasses import dataclass

import torch

# Forward passes at least this many times faster than eager, for digit_cnn and mobilenet_v3_small;
# the model's calls for one digit at most this fraction of eager's.
TARGET_FORWARD_SPEEDUP = 2.5
TARGET_CALLS_FRACTION = 0.6
PHOTO_NETWORKS = ("mobilenet_v3_small", "resnet18")


@dataclass
class Pair:
    """Milliseconds per call with each engine (medians of the rounds)."""

    what: str
    torch_ms: float
    onnx_ms: float
    max_difference: float
    flops: float | None = None  # of one forward pass, for the forward-only pairs

    @property
    def speedup(self):
        return self.torch_ms / self.onnx_ms

    def gflops(self, ms):
        """GFLOP/s of a forward pass taking ``ms``."""
        return self.flops / ms / 1e6

    def speedup_bound(self, peak_gflops):
        """The largest speed-up over eager any engine can give: eager's time over the pass's
        operations at the core's peak."""
        return self.torch_ms / (self.flops / peak_gflops / 1e6)


def _median_ms(call, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _pair(what, eager_call, onnx_call, rounds, runs, difference):
    eager, onnx = [], []
    eager_call(), onnx_call()  # warm
    for _ in range(rounds):  # interleaved: a busy moment costs both alike
        eager.append(_median_ms(eager_call, runs))
        onnx.append(_median_ms(onnx_call, runs))
    return Pair(what, statistics.median(eager), statistics.median(onnx), difference)


def forward_flops(module, shape):
    """Floating-point operations of one forward pass of ``module`` on a batch of one ``shape`` image."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(torch.zeros((1, *shape)))
    return counter.get_total_flops()


def gemm_peak_gflops(sizes=(256, 512, 1024), rounds=5):
    """This core's fp32 matrix-multiply rate, GFLOP/s: the best median of square ``torch.mm`` products
    (oneDNN's or MKL's kernels) on the current number of threads."""
    best = 0.0
    for size in sizes:
        left, right = torch.rand(size, size), torch.rand(size, size)
        runs = max(5, 2 * 1024**3 // size**3)
        for _ in range(rounds):
            ms = _median_ms(lambda a=left, b=right: torch.mm(a, b), runs)
            best = max(best, 2 * size**3 / ms / 1e6)
    return best


def measure(model_path, png, rounds=5, runs=40):
    """(Forward-only pairs for the three networks and the one-digit calls pair, the fastest fp32
    rate measured on this core in GFLOP/s: a square matrix product's or any of those forward passes')."""
    from service import engines
    from service.formats import read_model
    from service.inference import Classifier
    from service.preprocess import InputSpec
    from torchvision import models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digits, _ = read_model(model_path.read_bytes())
        networks = [("digit_cnn 1×28×28", digits)]
        for name in PHOTO_NETWORKS:
            torch.manual_seed(0)
            module = models.get_model(name, weights=None, num_classes=10).eval().to(memory_format=torch.channels_last)
            networks.append((f"{name} 3×224×224", Classifier(module, tuple(map(str, range(10))),
                                                             InputSpec(channels=3, height=224, width=224))))
        pairs = []
        for label, classifier in networks:
            onnx, difference = engines.export_checked(classifier, 8)
            runner = engines.OnnxRunner(onnx, threads=1)
            batch = torch.rand((1, *classifier.input_spec.shape))

            def eager(module=classifier.module, batch=batch):
                with torch.inference_mode():
                    return module(batch)

            photo = classifier.input_spec.channels == 3  # tens of milliseconds a pass: fewer of them
            pair = _pair(f"forward, {label}", eager, lambda r=runner, b=batch: r(b), rounds,
                         max(5, runs // 8) if photo else runs, difference)
            pair.flops = forward_flops(classifier.module, classifier.input_spec.shape)
            pairs.append(pair)
        onnx, difference = engines.export_checked(digits, 8)
        served, _ = read_model(model_path.read_bytes())
        served.runner = engines.OnnxRunner(onnx, threads=1)
        max_pixels = 4096 * 4096

        def calls(classifier):
            return lambda: classifier.classify([classifier.prepare(png, "digit.png", max_pixels)])

        pairs.append(_pair("prepare + classify, one digit", calls(digits), calls(served), rounds, runs, difference))
        rates = [pair.gflops(min(pair.torch_ms, pair.onnx_ms)) for pair in pairs if pair.flops]
        return pairs, max(gemm_peak_gflops(), *rates)
    finally:
        torch.set_num_threads(threads)


def table(pairs, peak_gflops):
    lines = [
        "| what (one thread, batch 1) | eager PyTorch ms | ONNX Runtime ms | speed-up | max abs diff of probabilities "
        "| MFLOP | GFLOP/s eager | GFLOP/s ONNX Runtime | the most any engine can give |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair in pairs:
        row = (f"| {pair.what} | {pair.torch_ms:.2f} | {pair.onnx_ms:.2f} | {pair.speedup:.2f} × | "
               f"{pair.max_difference:.0e} |")
        if pair.flops:
            row += (f" {pair.flops / 1e6:,.0f} | {pair.gflops(pair.torch_ms):.0f} | {pair.gflops(pair.onnx_ms):.0f} "
                    f"| {pair.speedup_bound(peak_gflops):.1f} × |")
        else:
            row += " – | – | – | – |"
        lines.append(row)
    lines.append("")
    lines.append(
        f"The fastest fp32 rate measured on this core, one thread (square torch.mm products of 256 to 1024, or any "
        f"forward pass above): {peak_gflops:.0f} GFLOP/s. \"The most any engine can give\" is eager's time over the "
        "pass's operations at that rate."
    )
    return "\n".join(lines)


def verdicts(pairs, peak_gflops):
    """(lines, all met) for the engine targets measurable in-process."""
    lines, met = [], True
    for pair in pairs:
        if pair.what.startswith("forward") and not pair.what.startswith("forward, resnet18"):
            ok = pair.speedup >= TARGET_FORWARD_SPEEDUP
            bound = pair.speedup_bound(peak_gflops)
            why = "" if ok or bound >= TARGET_FORWARD_SPEEDUP else (
                f" (this core allows at most {bound:.1f} ×: ONNX Runtime runs it at {pair.gflops(pair.onnx_ms):.0f} "
                f"GFLOP/s; the fastest rate measured on this core is {peak_gflops:.0f})")
            lines.append(f"- {'met' if ok else 'MISSED'}: {pair.what} ≥ {TARGET_FORWARD_SPEEDUP} × faster on "
                         f"ONNX Runtime: {pair.speedup:.2f} ×{why}")
        elif pair.what.startswith("prepare"):
            ok = pair.onnx_ms / pair.torch_ms <= TARGET_CALLS_FRACTION
            lines.append(f"- {'met' if ok else 'MISSED'}: the model's calls for one digit ≤ {TARGET_CALLS_FRACTION} "
                         f"× eager's: {pair.onnx_ms / pair.torch_ms:.2f} ×")
        else:
            continue
        met = met and ok
    return lines, met
