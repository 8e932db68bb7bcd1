"""The inference engines side by side, in this process with one thread, interleaved rounds:

- the forward pass alone, batch 1: digit_cnn (the served checkpoint), torchvision's
  mobilenet_v3_small and resnet18 (random weights, channels-last as the service builds them),
  eager PyTorch against ONNX Runtime running the service's own export (service.engines);
- the model's calls for one digit as the predict view makes them (``prepare`` + ``classify``),
  with either engine.
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

    @property
    def speedup(self):
        return self.torch_ms / self.onnx_ms


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


def measure(model_path, png, rounds=5, runs=40):
    """Forward-only pairs for the three networks and the one-digit calls pair."""
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
            pairs.append(_pair(f"forward, {label}", eager, lambda r=runner, b=batch: r(b), rounds,
                               max(5, runs // 8) if photo else runs, difference))
        onnx, difference = engines.export_checked(digits, 8)
        served, _ = read_model(model_path.read_bytes())
        served.runner = engines.OnnxRunner(onnx, threads=1)
        max_pixels = 4096 * 4096

        def calls(classifier):
            return lambda: classifier.classify([classifier.prepare(png, "digit.png", max_pixels)])

        pairs.append(_pair("prepare + classify, one digit", calls(digits), calls(served), rounds, runs, difference))
        return pairs
    finally:
        torch.set_num_threads(threads)


def table(pairs):
    lines = [
        "| what (one thread, batch 1) | eager PyTorch ms | ONNX Runtime ms | speed-up | max abs diff of probabilities |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pair in pairs:
        lines.append(f"| {pair.what} | {pair.torch_ms:.2f} | {pair.onnx_ms:.2f} | {pair.speedup:.2f} × | "
                     f"{pair.max_difference:.0e} |")
    return "\n".join(lines)


def verdicts(pairs):
    """(lines, all met) for the engine targets measurable in-process."""
    lines, met = [], True
    for pair in pairs:
        if pair.what.startswith("forward") and not pair.what.startswith("forward, resnet18"):
            ok = pair.speedup >= TARGET_FORWARD_SPEEDUP
            lines.append(f"- {'met' if ok else 'MISSED'}: {pair.what} ≥ {TARGET_FORWARD_SPEEDUP} × faster on "
                         f"ONNX Runtime: {pair.speedup:.2f} ×")
        elif pair.what.startswith("prepare"):
            ok = pair.onnx_ms / pair.torch_ms <= TARGET_CALLS_FRACTION
            lines.append(f"- {'met' if ok else 'MISSED'}: the model's calls for one digit ≤ {TARGET_CALLS_FRACTION} "
                         f"× eager's: {pair.onnx_ms / pair.torch_ms:.2f} ×")
        else:
            continue
        met = met and ok
    return lines, met
