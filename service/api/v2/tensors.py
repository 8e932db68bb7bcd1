"""Open Inference Protocol tensors: parse an inference request, encode a response (no Flask here).

A request is a JSON object, optionally followed by a binary section (the binary tensor data
extension): the ``Inference-Header-Content-Length`` header then says where the JSON ends, and each
input with a ``binary_data_size`` parameter takes that many bytes of the section, in input order.
Numbers are little-endian; a BYTES tensor's elements are each a 4-byte little-endian length and
that many bytes. Every way a request can be malformed raises :class:`ProtocolError`, one line.
"""

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
OUTPUTS = (PROBABILITIES_OUTPUT, LABEL_OUTPUT)
INPUT_DATATYPES = {IMAGE_INPUT: "BYTES", TENSOR_INPUT: "FP32"}
BINARY_SIZE = "binary_data_size"
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """An inference request that does not follow the protocol or fit the model; one line why."""


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: one input's elements, and the outputs to return, binary or not.

    ``images`` holds encoded image files (input ``image``); ``tensor`` an Nx``shape`` float32 array
    (input ``input``). ``outputs`` maps each output to return to True when it goes in the binary
    section.
    """

    id: str | None
    images: list[bytes] | None
    tensor: np.ndarray | None
    outputs: dict

    @property
    def batch_size(self):
        return len(self.images) if self.images is not None else self.tensor.shape[0]


def split_body(body, header_length):
    """Split a request body into its JSON header and its binary section.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None when absent: the
    whole body is JSON).
    """
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit():
        raise ProtocolError(f"Inference-Header-Content-Length must be a whole number, got {header_length[:40]!r}")
    length = int(text)
    if length < 2 or length > len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes: "
            "the JSON header must fit in the body"
        )
    return body[:length], body[length:]


def _object(value, what):
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _flag(parameters, name, what):
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} parameter {name!r} must be true or false")
    return value


def _shape(tensor, name):
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a non-empty list of whole numbers, got {shape!r}")
    return shape


def _reject_constant(text):
    raise ProtocolError(f"the JSON header contains {text}, which is not a number JSON allows")


def parse_request(header, binary, *, input_shape, max_batch):
    """Parse and check an inference request against the model; return an :class:`InferRequest`.

    ``input_shape`` is the model's (C, H, W); ``max_batch`` (MAX_FILES) bounds the batch. The
    binary section must be exactly the sum of the inputs' ``binary_data_size``.
    """
    try:
        document = json.loads(header, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise ProtocolError(f"the request is not valid JSON ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    document = _object(document, "the request")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    parameters = _object(document.get("parameters") or {}, "parameters")
    binary_default = _flag(parameters, "binary_data_output", "the request's")

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("inputs must be a non-empty list")
    offset = 0
    chunks = {}
    for tensor in inputs:
        tensor = _object(tensor, "each input")
        name = tensor.get("name")
        if name not in INPUT_DATATYPES:
            raise ProtocolError(f"unknown input {name!r}: send {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")
        if name in chunks:
            raise ProtocolError(f"input {name!r} is given twice")
        size = _object(tensor.get("parameters") or {}, f"input {name!r} parameters").get(BINARY_SIZE)
        if size is None:
            chunks[name] = None
            continue
        if type(size) is not int or size < 0:
            raise ProtocolError(f"input {name!r}: {BINARY_SIZE} must be a whole number, got {size!r}")
        if "data" in tensor:
            raise ProtocolError(f"input {name!r} has both data and {BINARY_SIZE}: send one")
        if offset + size > len(binary):
            raise ProtocolError(
                f"input {name!r}: {BINARY_SIZE} is {size} but only {len(binary) - offset} bytes of binary data "
                "are left (truncated body, or sizes that do not add up)"
            )
        chunks[name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise ProtocolError(
            f"the binary section has {len(binary)} bytes but the inputs' {BINARY_SIZE} add up to {offset}"
        )
    if len(inputs) != 1:
        raise ProtocolError(f"send one input, {IMAGE_INPUT!r} or {TENSOR_INPUT!r}, not {len(inputs)}")

    tensor = inputs[0]
    name = tensor["name"]
    datatype = tensor.get("datatype")
    if datatype != INPUT_DATATYPES[name]:
        raise ProtocolError(f"input {name!r} must have datatype {INPUT_DATATYPES[name]}, got {datatype!r}")
    shape = _shape(tensor, name)
    batch = shape[0]
    if name == IMAGE_INPUT and shape[1:] not in ([], [1]):
        raise ProtocolError(f"input {name!r}: shape must be [N] (one encoded image per element), got {shape}")
    if name == TENSOR_INPUT and shape[1:] != list(input_shape):
        raise ProtocolError(f"input {name!r}: shape must be {[-1, *input_shape]} for this model, got {shape}")
    if batch < 1 or batch > max_batch:
        raise ProtocolError(
            f"input {name!r}: the batch (first dimension) must be 1 to {max_batch} (MAX_FILES), got {batch}"
        )
    if name == IMAGE_INPUT:
        data = chunks[name]
        images = _bytes_from_binary(data, batch, name) if data is not None else _bytes_from_json(tensor, batch, name)
        tensor_data = None
    else:
        data = chunks[name]
        tensor_data = _floats(data, tensor, shape, name)
        images = None

    return InferRequest(request_id, images, tensor_data, _requested_outputs(document, binary_default))


def _bytes_from_binary(data, count, name):
    elements, offset = [], 0
    for index in range(count):
        if offset + 4 > len(data):
            raise ProtocolError(f"input {name!r}: element {index}'s length prefix is cut short")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise ProtocolError(
                f"input {name!r}: element {index} says {length} bytes but only {len(data) - offset} are left"
            )
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise ProtocolError(
            f"input {name!r}: {len(data) - offset} bytes are left after its {count} elements "
            f"({BINARY_SIZE} does not match the shape)"
        )
    return elements


def _bytes_from_json(tensor, count, name):
    data = tensor.get("data")
    if isinstance(data, list) and all(isinstance(item, list) and len(item) == 1 for item in data):
        data = [item[0] for item in data]  # shape [N, 1] written nested
    if not isinstance(data, list) or len(data) != count or not all(isinstance(item, str) for item in data):
        raise ProtocolError(
            f"input {name!r}: data must be a list of {count} base64 strings (or send it as binary data)"
        )
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, ValueError):
        raise ProtocolError(f"input {name!r}: data must be base64-encoded image files") from None


def _floats(data, tensor, shape, name):
    count = math.prod(shape)
    if data is not None:
        if len(data) != count * 4:
            raise ProtocolError(
                f"input {name!r}: {BINARY_SIZE} is {len(data)} bytes but shape {shape} of FP32 needs {count * 4}"
            )
        array = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)  # astype copies
    else:
        values = tensor.get("data")
        if not isinstance(values, list):
            raise ProtocolError(f"input {name!r}: data must be a list of {count} numbers (or send it as binary data)")
        try:
            array = np.asarray(values, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError(f"input {name!r}: data must hold numbers only, flat or nested as the shape") from None
        if array.size != count:
            raise ProtocolError(f"input {name!r}: data has {array.size} numbers but shape {shape} needs {count}")
        array = array.reshape(shape)
    if not np.isfinite(array).all():
        raise ProtocolError(f"input {name!r}: some values are not finite numbers (NaN or infinity)")
    return array


def _requested_outputs(document, binary_default):
    requested = document.get("outputs")
    if requested is None:
        return {name: binary_default for name in OUTPUTS}
    if not isinstance(requested, list) or not requested:
        raise ProtocolError("outputs must be a non-empty list when given")
    outputs = {}
    for output in requested:
        output = _object(output, "each output")
        name = output.get("name")
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {name!r}: this model has {', '.join(repr(o) for o in OUTPUTS)}")
        if name in outputs:
            raise ProtocolError(f"output {name!r} is asked for twice")
        parameters = _object(output.get("parameters") or {}, f"output {name!r} parameters")
        if "classification" in parameters:
            raise ProtocolError(f"output {name!r}: the classification extension is not supported; ask for 'label'")
        outputs[name] = _flag(parameters, "binary_data", f"output {name!r}") if "binary_data" in parameters \
            else binary_default
    return outputs


def encode_bytes(elements):
    """BYTES elements as the binary tensor data extension lays them out: length-prefixed."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def encode_response(model_name, model_version, request_id, outputs, probabilities, labels):
    """The response body and its JSON header's length (None when there is no binary section).

    ``outputs`` is :attr:`InferRequest.outputs`; ``probabilities`` an NxL float32 array and
    ``labels`` the N predicted labels.
    """
    body = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        body["id"] = request_id
    tensors, binary = [], []
    for name, as_binary in outputs.items():
        if name == PROBABILITIES_OUTPUT:
            tensor = {"name": name, "datatype": "FP32", "shape": list(probabilities.shape)}
            raw = np.ascontiguousarray(probabilities, dtype="<f4")
            payload, values = (raw.tobytes(), None) if as_binary else (None, raw.ravel().tolist())
        else:
            tensor = {"name": name, "datatype": "BYTES", "shape": [len(labels)]}
            payload, values = (encode_bytes([label.encode() for label in labels]), None) if as_binary \
                else (None, list(labels))
        if payload is not None:
            tensor["parameters"] = {BINARY_SIZE: len(payload)}
            binary.append(payload)
        else:
            tensor["data"] = values
        tensors.append(tensor)
    body["outputs"] = tensors
    header = json.dumps(body, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)
