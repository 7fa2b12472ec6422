"""A tiny WD14-shaped ONNX model written byte by byte (the `onnx` package needs protobuf >= 3.20.2; the WebUI
pins 3.20.0): input [N, size, size, 3] float32 BGR -> mean colour @ W + B -> sigmoid -> [N, tags]."""

from __future__ import annotations

import numpy as np

FLOAT = 1  # TensorProto.FLOAT


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, FLOAT) + _bytes(8, name) + _bytes(9, array.astype("<f4").tobytes())


def _value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    tensor_type = _int(1, FLOAT) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: list[str], outputs: list[str], attributes: bytes = b"") -> bytes:
    return b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op) + attributes


def tagger_model(weights: np.ndarray, bias: np.ndarray, size: int = 32, input_name: str = "input") -> bytes:
    """ModelProto bytes; ``weights`` [3, tags] act on the mean B, G, R (0..255), ``bias`` [tags] are logits."""
    axes = _bytes(5, _bytes(1, "axes") + _int(20, 7) + b"".join(_int(8, a) for a in (1, 2)))  # INTS
    keep = _bytes(5, _bytes(1, "keepdims") + _int(20, 2) + _int(3, 0))  # INT
    nodes = [_node("ReduceMean", [input_name], ["mean"], axes + keep), _node("MatMul", ["mean", "W"], ["logit0"]),
             _node("Add", ["logit0", "B"], ["logit"]), _node("Sigmoid", ["logit"], ["output"])]
    tags = int(bias.shape[0])
    graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "tiny_tagger")
             + _bytes(5, _tensor("W", weights)) + _bytes(5, _tensor("B", bias))
             + _bytes(11, _value_info(input_name, ["N", size, size, 3]))
             + _bytes(12, _value_info("output", ["N", tags])))
    opset = _bytes(1, "") + _int(2, 13)
    return _int(1, 8) + _bytes(2, "lora-train-tests") + _bytes(7, graph) + _bytes(8, opset)


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


__all__ = ["tagger_model", "logit"]
