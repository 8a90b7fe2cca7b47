"""Which TensorRT layers must stay FP32, and which precisions the built engine really runs.

Pure functions over plain data, tested without TensorRT: ``export.engine`` feeds them the parsed
network's layers and the engine inspector's JSON (``LayerInformationFormat.JSON`` at
``ProfilingVerbosity.DETAILED``; TensorRT 8.5 to 11 formats).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from reconad.runtime.errors import ReconadError

FLOAT_DTYPES = ("FLOAT", "HALF")  # trt.DataType names of the tensors precision constraints apply to
# Layers that compute nothing a precision constraint could change.
UNCONSTRAINED_LAYER_TYPES = ("CONSTANT", "SHAPE", "ASSERTION")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)(?: \| [^\]]*)?\]")
# Characters that can delimit a layer name inside a fused engine layer's name:
# "a + b", "PWN(PWN(a), b)", "{ForeignNode[a...b]}".
_NAME_BOUNDARIES = frozenset(" +(),[]{}")


@dataclasses.dataclass(frozen=True)
class NetworkLayer:
    """One layer of a parsed ``INetworkDefinition``, reduced to what the precision policy needs.

    Attributes:
        index: position in the network (``network.get_layer(index)``).
        name: the layer name (the ONNX node name, possibly with a ``_N`` suffix, or
            ``(Unnamed Layer* N) [Type]`` for layers the parser did not name).
        type_name: ``trt.LayerType`` name, e.g. ``"CONVOLUTION"``.
        output_names: names of its output tensors.
        output_dtypes: ``trt.DataType`` names of its outputs, e.g. ``"FLOAT"``, ``"HALF"``, ``"INT32"``.
        metadata: ``ILayer.metadata`` where TensorRT has it, ``"[ONNX Layer: <node name>]"``.
    """

    index: int
    name: str
    type_name: str
    output_names: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    metadata: str = ""


def onnx_names_in_metadata(metadata: str) -> list[str]:
    """ONNX node names in a layer's metadata: ``"[ONNX Layer: a]\\x1e[ONNX Layer: b | Local Function: f]"`` -> a, b."""
    return [match.group(1) for match in _ONNX_LAYER.finditer(metadata or "")]


def assign_layers_to_nodes(
    layers: Sequence[NetworkLayer], node_outputs: Sequence[tuple[str, Sequence[str]]]
) -> dict[int, str]:
    """Map network layer indices to the name of the ONNX node that created each layer.

    TensorRT's ONNX parser imports nodes in graph order, adds each node's layers one after another,
    and names the tensors that leave a node after the node's ONNX outputs. So the layers up to and
    including one that produces an ONNX output tensor belong to that output's node. Layers with
    ``[ONNX Layer: name]`` metadata are assigned by it. Layers after the last recognised output (or
    whose node made only constant weights) stay unassigned.

    Args:
        layers: the network's layers in order.
        node_outputs: ``(node name, output tensor names)`` for every node of the parsed ONNX graph.
    """
    node_of_tensor = {tensor: node for node, outputs in node_outputs for tensor in outputs if tensor}
    assigned: dict[int, str] = {}
    pending: list[int] = []
    for layer in layers:
        named = onnx_names_in_metadata(layer.metadata)
        if named:
            assigned[layer.index] = named[0]
            continue
        pending.append(layer.index)
        producers = [node_of_tensor[name] for name in layer.output_names if name in node_of_tensor]
        if producers:
            for index in pending:
                assigned[index] = producers[0]
            pending = []
    return assigned


def select_island_layers(
    layers: Sequence[NetworkLayer],
    node_outputs: Sequence[tuple[str, Sequence[str]]],
    island_nodes: Collection[str],
) -> tuple[list[NetworkLayer], list[str]]:
    """The network layers that implement the FP32 island nodes and compute floats.

    Returns:
        ``(layers to constrain, island nodes no such layer was found for)``. Constant and shape
        layers, and layers with no floating-point output, are left out: there is nothing to constrain.
    """
    islands = set(island_nodes)
    assignment = assign_layers_to_nodes(layers, node_outputs)
    chosen, covered = [], set()
    for layer in layers:
        node = assignment.get(layer.index)
        if node not in islands:
            continue
        covered.add(node)
        if layer.type_name not in UNCONSTRAINED_LAYER_TYPES and any(d in FLOAT_DTYPES for d in layer.output_dtypes):
            chosen.append(layer)
    return chosen, [node for node in island_nodes if node not in covered]


def typed_layer_names(layers: Iterable[NetworkLayer]) -> tuple[set[str], set[str]]:
    """For a strongly typed network: (names of FP32 float layers, names of layers with FP16 outputs).

    Names include each layer's ONNX node names from its metadata, so fused engine layers that only
    carry metadata can be matched too.
    """
    fp32, fp16 = set(), set()
    for layer in layers:
        floats = [dtype for dtype in layer.output_dtypes if dtype in FLOAT_DTYPES]
        if not floats or layer.type_name in UNCONSTRAINED_LAYER_TYPES:
            continue
        names = {layer.name, *onnx_names_in_metadata(layer.metadata)}
        (fp16 if "HALF" in floats else fp32).update(names)
    return fp32, fp16 - fp32


def field(entry: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` in ``entry``, keys compared case-insensitively; None if none.

    TensorRT's inspector JSON has changed the case of its keys between releases (``"DataType"``,
    ``"Datatype"``), so every key is read this way.
    """
    lowered = {str(key).lower(): value for key, value in entry.items()}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


_TENSOR_TYPE_KEYS = ("Format/Datatype", "Datatype", "DataType", "Data Type", "Format", "Type")


def tensor_precision(entry: Mapping[str, Any]) -> str | None:
    """``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp8"``, ``"int8"``, ``"int"`` or None (unknown) for one inspector tensor.

    TensorRT 8.x/10.x describe a tensor as ``"Format/Datatype": "Channel major FP16 format where
    channel % 8 == 0"`` (Myelin regions: ``"Half"``, ``"Float"``); TensorRT 11 splits it into a per-tensor
    ``"Datatype"`` and ``"Format"`` (its own trex tooling reads those two). Both layouts are read, keys in
    any case.
    """
    lowered = {str(key).lower(): value for key, value in entry.items()}
    text = " ".join(str(lowered.get(key.lower(), "")) for key in _TENSOR_TYPE_KEYS).upper()
    if "BFLOAT16" in text or "BF16" in text:
        return "bf16"
    if "FP16" in text or "HALF" in text:
        return "fp16"
    if "FP32" in text or "FLOAT" in text:
        return "fp32"
    if "FP8" in text:
        return "fp8"
    if "INT8" in text and "UINT8" not in text:
        return "int8"
    if any(word in text for word in ("INT32", "INT64", "UINT8", "INT4", "BOOL")):
        return "int"
    return None


def parse_engine_layers(engine_information: str | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``Layers`` list of ``EngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    Raises:
        ReconadError: not JSON, or layers without details (the engine was built without
            ``ProfilingVerbosity.DETAILED``, so its precisions cannot be checked).
    """
    if isinstance(engine_information, str):
        try:
            engine_information = json.loads(engine_information)
        except json.JSONDecodeError as error:
            raise ReconadError(f"The engine inspector's output is not JSON ({error.msg}).") from None
    layers = field(engine_information, "Layers") if isinstance(engine_information, Mapping) else None
    if not isinstance(layers, list) or not layers:
        raise ReconadError("The engine inspector listed no layers, so the engine's precision cannot be checked.")
    if not all(isinstance(layer, Mapping) for layer in layers):
        raise ReconadError(
            "The engine inspector gave layer names only: the engine was built without detailed profiling "
            "verbosity, so its precision cannot be checked."
        )
    return [dict(layer) for layer in layers]


def _is_opaque(layer: Mapping[str, Any]) -> bool:
    """Myelin regions (``{ForeignNode[first...last]}``) hide the layers and precisions inside them."""
    return str(field(layer, "LayerType") or "").lower() == "myelin" or str(field(layer, "Name") or "").startswith("{ForeignNode[")


def _is_reformat(layer: Mapping[str, Any]) -> bool:
    """Format/type conversions TensorRT inserts, named after the layer they serve (``Reformatting CopyNode
    for Input Tensor 0 to softmax``): not computations of that layer, so not checked as one."""
    return str(field(layer, "LayerType") or "").lower() == "reformat" or str(field(layer, "Name") or "").startswith("Reformatting")


def _contains_name(text: str, name: str) -> bool:
    start = text.find(name)
    while start != -1:
        end = start + len(name)
        before_ok = start == 0 or text[start - 1] in _NAME_BOUNDARIES
        after_ok = end == len(text) or text[end] in _NAME_BOUNDARIES
        if before_ok and after_ok:
            return True
        start = text.find(name, start + 1)
    return False


def _covered_names(layer: Mapping[str, Any], candidates: Collection[str]) -> set[str]:
    covered = set(onnx_names_in_metadata(str(field(layer, "Metadata") or ""))) & set(candidates)
    if not _is_opaque(layer):
        name = str(field(layer, "Name") or "")
        covered |= {candidate for candidate in candidates if candidate in name and _contains_name(name, candidate)}
    return covered


_LOW_PRECISIONS = ("fp16", "bf16", "fp8", "int8")  # what an FP32-island layer must not run in


def weight_precisions(layer: Mapping[str, Any]) -> list[str]:
    """The precisions of a layer's weight blobs: ``"Weights"``/``"Bias"`` (8.x, 10.x) or any key naming
    weights or a bias whose value is a blob with a type (``"Type"``/``"Datatype"``), keys in any case."""
    found = []
    for key, blob in layer.items():
        lowered = str(key).lower()
        if isinstance(blob, Mapping) and ("weight" in lowered or "bias" in lowered or "kernel" in lowered):
            kind = str(field(blob, "Type", "Datatype", "DataType") or "").upper()
            if kind in ("HALF", "FP16", "FLOAT16"):
                found.append("fp16")
            elif kind in ("INT8", "INT8_T"):
                found.append("int8")
            elif kind:
                found.append(tensor_precision({"Datatype": kind}) or kind.lower())
    return found


@dataclasses.dataclass(frozen=True)
class LayerPrecisionReport:
    """What the engine inspector says about an engine's precisions.

    Attributes:
        layer_count: engine layers (after fusion).
        tensor_counts: layer output tensors per precision (``"fp16"``, ``"fp32"``, ``"int8"``, ...).
        fp16_weights: weight/bias blobs stored as FP16.
        opaque_layers: Myelin regions, whose inner precisions the inspector does not show.
        island_layers: engine layers made only of FP32-island layers (checked).
        island_violations: ``"<engine layer>: <tensor> is fp16"`` (or int8) for island layers not in FP32.
        islands_unverified: island layer names found only inside fused or opaque layers.
        islands_not_found: island layer names in no engine layer (folded away, or hidden in a Myelin
            region without metadata).
        int8_weights: weight blobs stored as INT8 (explicit quantization).
    """

    layer_count: int
    tensor_counts: dict[str, int]
    fp16_weights: int
    opaque_layers: tuple[str, ...]
    island_layers: tuple[str, ...]
    island_violations: tuple[str, ...]
    islands_unverified: tuple[str, ...]
    islands_not_found: tuple[str, ...]
    int8_weights: int = 0

    @property
    def has_fp16(self) -> bool:
        return self.tensor_counts.get("fp16", 0) > 0 or self.fp16_weights > 0

    @property
    def has_int8(self) -> bool:
        return self.tensor_counts.get("int8", 0) > 0 or self.int8_weights > 0

    def problems(self, requested: str) -> list[str]:
        """One sentence per way the engine is not what ``requested`` (``"fp16"``/``"fp32"``/``"int8"``) asked for."""
        found = []
        hidden = f", {len(self.opaque_layers)} of them opaque Myelin regions" if self.opaque_layers else ""
        if requested == "fp16" and not self.has_fp16:
            found.append(
                f"The engine came out FP32: the inspector shows no FP16 tensor or weight in its "
                f"{self.layer_count} layers{hidden}"
            )
        if requested == "int8" and not self.has_int8:
            found.append(
                f"The engine has no INT8 layer: the inspector shows no INT8 tensor or weight in its "
                f"{self.layer_count} layers{hidden}, so TensorRT did not honour the graph's Q/DQ nodes"
            )
        if requested == "fp32" and (self.has_fp16 or self.has_int8):
            found.append(
                f"The engine has {self.tensor_counts.get('fp16', 0)} FP16 tensors, {self.fp16_weights} FP16 weights and "
                f"{self.tensor_counts.get('int8', 0)} INT8 tensors although fp32 was requested"
            )
        if self.island_violations:
            kinds = "/".join(sorted({violation.rsplit(" is ", 1)[-1].upper() for violation in self.island_violations}))
            found.append(f"{len(self.island_violations)} FP32-island layers run in {kinds}, e.g. {self.island_violations[0]}")
        return found

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest for the engine manifest's ``build_details``."""
        return {
            "layer_count": self.layer_count,
            "tensor_counts": dict(self.tensor_counts),
            "fp16_weights": self.fp16_weights,
            "int8_weights": self.int8_weights,
            "opaque_layers": len(self.opaque_layers),
            "island_layers_checked": len(self.island_layers),
            "island_violations": list(self.island_violations[:20]),
            "islands_unverified": len(self.islands_unverified),
            "islands_not_found": len(self.islands_not_found),
        }


def analyze_layer_precisions(
    engine_information: str | Mapping[str, Any],
    fp32_names: Collection[str],
    other_names: Collection[str] = (),
) -> LayerPrecisionReport:
    """Check an engine's layer precisions against the names that must stay FP32.

    An engine layer whose constituent names (from its fused name, or its ONNX metadata) are all in
    ``fp32_names`` must have FP32 float outputs (not FP16, BF16, FP8 or INT8); one that mixes them with
    ``other_names``, or a Myelin region, cannot be checked from outside and is reported as unverified.
    Keys are read case-insensitively and both tensor layouts (``"Format/Datatype"``; TensorRT 11's
    ``"Datatype"`` + ``"Format"``) are understood (``tensor_precision``).

    Args:
        engine_information: the inspector's engine JSON (text or parsed).
        fp32_names: network layer names (and their ONNX node names) that must compute in FP32.
        other_names: the remaining network layer / ONNX node names, which may be FP16 or INT8.
    """
    layers = parse_engine_layers(engine_information)
    fp32_names, other_names = set(fp32_names), set(other_names) - set(fp32_names)
    counts: dict[str, int] = {}
    fp16_weights = int8_weights = 0
    opaque, island_layers, violations = [], [], []
    verified, unverified, seen = set(), set(), set()
    for layer in layers:
        name = str(field(layer, "Name") or "")
        outputs = [entry for entry in field(layer, "Outputs") or [] if isinstance(entry, Mapping)]
        precisions = [(str(field(entry, "Name") or "?"), tensor_precision(entry)) for entry in outputs]
        for _, precision in precisions:
            if precision is not None:
                counts[precision] = counts.get(precision, 0) + 1
        weights = weight_precisions(layer)
        fp16_weights += weights.count("fp16")
        int8_weights += weights.count("int8")
        if _is_opaque(layer):
            opaque.append(name)
        if _is_reformat(layer):
            continue
        island_hits = _covered_names(layer, fp32_names)
        if not island_hits:
            continue
        seen |= island_hits
        if _is_opaque(layer) or _covered_names(layer, other_names):
            unverified |= island_hits
            continue
        island_layers.append(name)
        verified |= island_hits
        violations += [f"{name}: {tensor} is {p}" for tensor, p in precisions if p in _LOW_PRECISIONS]
    return LayerPrecisionReport(
        layer_count=len(layers),
        tensor_counts=counts,
        fp16_weights=fp16_weights,
        opaque_layers=tuple(opaque),
        island_layers=tuple(island_layers),
        island_violations=tuple(violations),
        islands_unverified=tuple(sorted(unverified - verified)),
        islands_not_found=tuple(sorted(fp32_names - seen)),
        int8_weights=int8_weights,
    )
