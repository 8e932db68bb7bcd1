"""The Classifier: a network on its device, batched forward passes -> probabilities -> labels.

Decoding lives in :mod:`service.images` and preprocessing in :mod:`service.preprocess`; none of
the three knows a web framework or MLflow.
"""

from dataclasses import dataclass, field

import torch

from service.images import decode_image
from service.preprocess import InputSpec, preprocess


@dataclass(frozen=True)
class Prediction:
    """One image's result: the top label, its probability and optionally the k best."""

    label: str
    confidence: float
    top_k: list[tuple[str, float]] | None = None


@dataclass
class Classifier:
    """A network in eval mode with the labels and input spec it was trained with."""

    module: torch.nn.Module
    labels: tuple[str, ...]
    input_spec: InputSpec = field(default_factory=InputSpec)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # What runs the forward pass instead of ``module`` (an engines.OnnxRunner), when one does.
    runner: object = None

    @property
    def engine(self):
        """``onnxruntime`` when a runner answers, else ``torch``."""
        return "onnxruntime" if self.runner is not None else "torch"

    def forward(self, batch):
        """Return class probabilities for a NxCxHxW batch in one forward pass.

        The network may end in logits or log-probabilities: softmax maps both to probabilities.
        """
        with torch.inference_mode():
            if self.runner is not None:
                output = self.runner(batch)
            else:
                output = self.module(batch.to(self.device, non_blocking=True))
            return torch.softmax(output.float(), dim=1).cpu()

    def classify(self, tensors, top_k=None):
        """Classify preprocessed CxHxW tensors in one batched forward pass, in the order given."""
        probabilities = self.forward(torch.stack(tensors))
        if probabilities.shape[1] != len(self.labels):
            raise RuntimeError(
                f"the network returned {probabilities.shape[1]} classes but the model has {len(self.labels)} labels"
            )
        k = top_k or 1
        values, indices = probabilities.topk(k, dim=1)
        results = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            ranked = [(self.labels[i], p) for i, p in zip(row_indices, row_values)]
            results.append(Prediction(ranked[0][0], ranked[0][1], ranked if top_k else None))
        return results

    def prepare(self, data, filename, max_pixels, budget=None):
        """Decode one upload and preprocess it at once: only its small tensor outlives the call,
        so a request of many large images never holds all their bitmaps together. ``budget`` (a
        PixelBudget) bounds the pixels all uploads of a request decode together."""
        image = decode_image(data, filename, max_pixels, budget=budget, keep=self.input_spec.decode_size())
        return preprocess(image, self.input_spec)

    def predict(self, images, top_k=None):
        """Classify decoded images in one batched forward pass, in the order given."""
        return self.classify([preprocess(image, self.input_spec) for image in images], top_k)

    def warm_up(self):
        """Run one forward pass on a blank batch, so the first request pays no set-up cost.

        Raises RuntimeError when the network's output does not fit the labels: better at start-up
        than as a 500 on every request.
        """
        probabilities = self.forward(torch.zeros((1, *self.input_spec.shape)))
        if tuple(probabilities.shape) != (1, len(self.labels)):
            raise RuntimeError(
                f"the network returned {list(probabilities.shape)} for one image: {probabilities.shape[-1]} "
                f"classes but the model has {len(self.labels)} labels"
            )
