"""Phone photos for ``make bench``: the JPEGs, the torchvision models, and what served photos are
measured against, in this process.

- :func:`phone_photo`: a phone-camera-like JPEG (12 MP, 4000x3000, quality 90, about 1.9 MB) made
  from one of scikit-learn's bundled sample photos, upscaled, with sensor grain and fine texture so
  that it compresses, and costs to decode, like a real one. Nothing is downloaded.
- :func:`write_checkpoint`: a torchvision classifier with random weights (the same compute as
  trained ones) in the plain-weights format the service serves, its weights enum named for the
  preprocessing and the 1000 categories.
- :class:`NaivePipeline`: how a photo is classified without the service's care, the baseline of the
  photo targets: Pillow decodes the whole JPEG, ``weights.transforms()`` resizes it, the network
  runs eagerly.
- :func:`margin_study`: the decode margin (the JPEG is decoded at the smallest libjpeg scale keeping
  its shorter side at least margin x the resize): decode + preprocess time, and how far the
  network's input and a network's probabilities move from the full decode's.
"""

import contextlib
import dataclasses
import io
import statistics
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as F

from config.settings import Settings
from service.formats import input_spec
from service.images import decode_image
from service.preprocess import preprocess


@dataclasses.dataclass(frozen=True)
class PhotoModel:
    """A torchvision classifier served in the photo runs, and its target: served p50 at
    concurrency 1 at most ``target`` x the naive pipeline's p50."""

    architecture: str
    weights: str
    target: float

    @property
    def metadata(self):
        return {"architecture": f"torchvision:{self.architecture}", "weights": self.weights}


PHOTO_MODELS = (
    PhotoModel("mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", 0.35),
    PhotoModel("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 0.5),
)
# The phone photo posted to the service, and the other sizes of the margin study: a 48 MP
# camera's full resolution and a 2 MP picture (a messaging app's resend, an older phone).
SERVED_PHOTO = (4000, 3000)
MARGIN_PHOTOS = ((4000, 3000), (8000, 6000), (1600, 1200))
MARGINS = (1, 2, 3, 4)
# The network whose probabilities the margin study compares (random weights), its last layer
# scaled so that its logits spread this much across the 1000 classes (standard deviation): the
# probabilities then neither sit all near 1/1000 nor all on one class, whatever the initialisation.
MARGIN_MODEL = PHOTO_MODELS[1]
LOGIT_STD = 2.0


def phone_photo(width=4000, height=3000, source="china.jpg", seed=0, quality=90):
    """A JPEG as a phone camera writes one (baseline, 4:2:0 chroma, ``quality``), ``width`` x
    ``height``: scikit-learn's 640x427 sample ``source`` cut to the aspect ratio, upscaled
    bicubically, with texture at about three pixels' scale and per-pixel grain. Upscaled alone, it is smooth from one pixel to the next, as no
    camera's photo is (12 MP: 1.35 MB; with the grain and texture 1.87 MB, whose entropy-coded
    data every decode reads whole). Same arguments, same bytes."""
    from sklearn.datasets import load_sample_image  # scikit-learn is heavy and only needed here

    sample = Image.fromarray(load_sample_image(source))
    crop_width = min(sample.width, round(sample.height * width / height))
    crop_height = min(sample.height, round(crop_width * height / width))
    left, top = (sample.width - crop_width) // 2, (sample.height - crop_height) // 2
    sample = sample.crop((left, top, left + crop_width, top + crop_height))
    pixels = np.asarray(sample.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    rng = np.random.default_rng(seed)
    texture = rng.normal(0.0, 3.0, size=(height // 3 + 1, width // 3 + 1)).astype(np.float32)
    noise = np.asarray(Image.fromarray(texture, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    noise = noise + rng.normal(0.0, 1.0, size=(height, width)).astype(np.float32) + 0.5
    pixels += noise[..., None]
    del noise
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    del pixels
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def write_checkpoint(path, model, seed=0):
    """``model`` (a PhotoModel) with random weights as the service reads it: its state_dict and the
    metadata naming its architecture and weights enum."""
    torch.manual_seed(seed)
    network = torchvision.models.get_model(model.architecture, weights=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": network.state_dict(), "metadata": model.metadata}, path)
    return path


def weights_mb(model):
    """The size of ``model``'s (a PhotoModel's) parameters and buffers in MB."""
    network = torchvision.models.get_model(model.architecture, weights=None)
    tensors = [*network.parameters(), *network.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors) / 1e6


@contextlib.contextmanager
def torch_threads(count):
    """Run the block with ``count`` torch threads, as a served worker does, then put them back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class NaivePipeline:
    """A photo classified the obvious way: ``Image.open(...).convert("RGB")`` decodes the whole JPEG,
    the weights enum's ``transforms()`` resizes, crops and normalises it, and the network (the
    checkpoint's, in eval mode) runs eagerly under inference mode."""

    def __init__(self, checkpoint, model):
        self.transforms = torchvision.models.get_weight(model.weights).transforms()
        self.network = torchvision.models.get_model(model.architecture, weights=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model_state_dict"]
        self.network.load_state_dict(state)
        self.network.eval()

    def __call__(self, data):
        """Class probabilities (1 x 1000) for one JPEG's bytes."""
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.inference_mode():
            return self.network(self.transforms(image).unsqueeze(0)).softmax(dim=1)


@dataclasses.dataclass
class Timing:
    """Wall-clock and CPU times of repeated calls, in milliseconds."""

    wall_ms: list[float]
    cpu_ms: list[float]

    @property
    def p50_ms(self):
        return statistics.median(self.wall_ms)

    def __add__(self, other):
        return Timing(self.wall_ms + other.wall_ms, self.cpu_ms + other.cpu_ms)


def time_calls(call, runs, warm_up=2):
    """Call ``call()`` ``warm_up`` times unmeasured, then ``runs`` times, each timed."""
    for _ in range(warm_up):
        call()
    wall, cpu = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        call()
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)
    return Timing(wall, cpu)


# --- the decode margin ------------------------------------------------------------------------


def interleaved_cpu_ms(calls, rounds):
    """The median CPU milliseconds of each call (key -> function), over ``rounds`` rounds that call
    each once, the order reversed every other round, after one unmeasured round.

    CPU time, not wall-clock: on a machine other work shares, a call's wall-clock time counts the
    time it waited for a core. Taking turns, drift in the machine's speed hits every call alike.
    """
    order = list(calls.items())
    times = {key: [] for key in calls}
    for round_ in range(rounds + 1):
        for key, call in order if round_ % 2 == 0 else order[::-1]:
            started = time.process_time()
            call()
            if round_:
                times[key].append((time.process_time() - started) * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


@dataclasses.dataclass
class MarginRow:
    """One photo decoded one way: at a margin, or whole (``margin`` None, the reference)."""

    photo: str
    megabytes: float
    margin: int | None
    side: int | None  # the shorter side the margin keeps: margin x the resize
    decoded: tuple[int, int]
    scale: int
    ms: float
    reference_ms: float
    mean_diff: float
    max_diff: float
    probability_diff: float
    same_top1: bool
    top_probability: float  # the full decode's top class's, for scale


def reference_pixels(data, transforms):
    """The full-decode torchvision pipeline before normalisation: the whole JPEG, the weights'
    resize (on the 8-bit image, antialiased) and center crop, as float pixels in [0, 1]."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = F.resize(image, transforms.resize_size, interpolation=transforms.interpolation,
                     antialias=transforms.antialias)
    return F.convert_image_dtype(F.pil_to_tensor(F.center_crop(image, transforms.crop_size)), torch.float)


def decode_at_margin(data, name, spec, margin):
    """What the service decodes a photo to when its margin is ``margin``: the image and the libjpeg scale."""
    image = Image.open(io.BytesIO(data))
    declared = image.width
    side = margin * spec.resize
    image = decode_image(data, name, Settings.MAX_IMAGE_PIXELS, keep=(side, side))
    return image, round(declared / image.width)


def scaled_network(model, inputs, logit_std=LOGIT_STD, seed=0):
    """``model``'s network, random weights, eval mode, its last layer scaled so that its logits on
    ``inputs`` (normalised, N x C x H x W) spread ``logit_std`` across classes on average; and that spread."""
    torch.manual_seed(seed)
    network = torchvision.models.get_model(model.architecture, weights=None).eval()
    last = network.fc
    with torch.inference_mode():
        spread = float(network(inputs).std(dim=1).mean())
        last.weight.mul_(logit_std / spread)
        last.bias.mul_(logit_std / spread)
        return network, float(network(inputs).std(dim=1).mean())


def margin_study(photos, margins=MARGINS, runs=7, model=MARGIN_MODEL):
    """For each photo (label -> JPEG bytes) and margin: decode + preprocess CPU time (the median of
    ``runs`` rounds taking turns with the other margins and the full decode), and the differences
    from the full decode: of the 224x224 pixels in [0, 1] before normalisation (mean and max abs),
    and of a network's probabilities (max abs, and whether its top class is the same). Rows, and
    the scaled network's logit spread."""
    spec = input_spec(model.metadata)
    raw = dataclasses.replace(spec, mean=None, std=None)
    transforms = torchvision.models.get_weight(model.weights).transforms()
    mean, std = torch.tensor(spec.mean).view(-1, 1, 1), torch.tensor(spec.std).view(-1, 1, 1)
    references = {label: reference_pixels(data, transforms) for label, data in photos.items()}
    # The service's own resize and crop of a whole decode gives exactly the reference: any
    # difference below comes from the reduced-scale decode alone.
    for label, data in photos.items():
        whole = preprocess(Image.open(io.BytesIO(data)).convert("RGB"), raw)
        if not torch.equal(whole, references[label]):
            raise RuntimeError(f"{label}: the service's resize and crop differ from torchvision's on a whole decode "
                               f"(by up to {float((whole - references[label]).abs().max()):.2g})")
    network, logit_std = scaled_network(model, torch.stack([(r - mean) / std for r in references.values()]))

    def probabilities(pixels):
        with torch.inference_mode():
            return network(((pixels - mean) / std).unsqueeze(0)).softmax(dim=1)[0]

    rows = []
    for label, data in photos.items():
        reference = references[label]
        expected = probabilities(reference)
        calls = {None: lambda: transforms(Image.open(io.BytesIO(data)).convert("RGB"))}
        for margin in margins:
            calls[margin] = lambda margin=margin: preprocess(decode_at_margin(data, label, spec, margin)[0], spec)
        cpu_ms = interleaved_cpu_ms(calls, runs)
        megabytes, size, top = len(data) / 1e6, Image.open(io.BytesIO(data)).size, float(expected.max())
        whole_ms = cpu_ms[None]
        rows.append(MarginRow(label, megabytes, None, None, size, 1, whole_ms, whole_ms, 0.0, 0.0, 0.0, True, top))
        for margin in margins:
            image, scale = decode_at_margin(data, label, spec, margin)
            pixels = preprocess(image, raw)
            difference = (pixels - reference).abs()
            got = probabilities(pixels)
            rows.append(MarginRow(
                label, megabytes, margin, margin * spec.resize, image.size, scale, cpu_ms[margin], whole_ms,
                float(difference.mean()), float(difference.max()), float((got - expected).abs().max()),
                int(got.argmax()) == int(expected.argmax()), top,
            ))
    return rows, logit_std
