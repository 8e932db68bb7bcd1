"""Network definitions that checkpoints name by architecture."""

import torch
from torch import nn
from torch.nn import functional as F


class DigitCNN(nn.Module):
    """The template's CNN for 1x28x28 grayscale digits; returns log-probabilities.

    Layer names match the template's checkpoints (and PyTorch's MNIST example), so their
    ``model_state_dict`` loads as it is.
    """

    input_shape = (1, 28, 28)

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


ARCHITECTURES = {"digit_cnn": DigitCNN}


def build(name, num_classes):
    """Instantiate the architecture called ``name`` with ``num_classes`` outputs."""
    try:
        return ARCHITECTURES[name](num_classes=num_classes)
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
