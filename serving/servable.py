"""One loaded model version: its SignatureDefs and a way to run them on numpy inputs.

TF2 SavedModels (they carry an object graph) load with tf.saved_model.load. TF1 exports run in
a tf.compat.v1 Session, as TF Serving's C++ loader runs every model: tf.saved_model.load cannot
read some of them (TF Serving's own saved_model_half_plus_three fails under TF 2.21).
Signatures come from saved_model.pb itself, so metadata is exactly what TF Serving reports.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving.errors import failed_precondition, invalid_argument

SERVE_TAG = "serve"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF2's initializer: listed in metadata, not callable
DEFAULT_SIGNATURE = "serving_default"


class LoadError(RuntimeError):
    """A version that cannot be served; its message becomes the version's status."""


def read_serve_meta_graph(version_dir: str) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraph tagged 'serve', read from saved_model.pb (through tf.io.gfile: any filesystem)."""
    pb = posixpath.join(str(version_dir), "saved_model.pb")
    if not tf.io.gfile.exists(pb):
        raise LoadError(f"{version_dir} has no saved_model.pb")
    model = saved_model_pb2.SavedModel()
    try:
        with tf.io.gfile.GFile(pb, "rb") as f:
            model.ParseFromString(f.read())
    except Exception as e:  # a truncated or foreign file
        raise LoadError(f"{pb} is not a SavedModel: {e}") from None
    for meta_graph in model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise LoadError(f"{pb} has no MetaGraph tagged '{SERVE_TAG}'")


def _first_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error)
    return text.splitlines()[0] if text else type(error).__name__


@functools.cache  # on every request's every input
def numpy_dtype(dtype_enum: int) -> np.dtype:
    return np.dtype(object) if dtype_enum == tf.string.as_datatype_enum else \
        np.dtype(tf.dtypes.as_dtype(dtype_enum).as_numpy_dtype)


def dtype_name(dtype_enum: int) -> str:
    return tf.dtypes.as_dtype(dtype_enum).name


class Servable:
    """A loaded version. `run` takes checked numpy inputs keyed by alias, returns outputs by alias."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, str(path)  # a gfile path: never pathlib
        meta_graph = read_serve_meta_graph(self.path)
        # All of them, __saved_model_init_op included: TF Serving's metadata lists it too.
        self.signature_defs = dict(meta_graph.signature_def)
        self.is_tf2 = len(meta_graph.object_graph_def.nodes) > 0
        self._functions, self._session = (self._load_tf2(), None) if self.is_tf2 else (None, self._load_session())
        # What requests are checked against (signature()): the SignatureDefs, where a TF1 input or
        # output declared without a shape takes its graph tensor's static shape.
        self._checked_signatures = self.signature_defs if self._session is None else {
            k: _with_graph_shapes(v, self._session.graph) for k, v in self.signature_defs.items()}

    def _load_tf2(self) -> dict:
        try:
            loaded = tf.saved_model.load(str(self.path), tags=[SERVE_TAG])
        except Exception as e:
            raise LoadError(f"cannot load SavedModel {self.path}: {_first_line(e)}") from None
        functions = {k: _caller(loaded.signatures[k], self.signature_defs[k])
                     for k in self.signature_defs if k in loaded.signatures}
        missing = set(self.signature_defs) - set(functions) - {INIT_OP_SIGNATURE}
        if missing:
            raise LoadError(f"SavedModel {self.path} lists signatures it cannot run: {sorted(missing)}")
        self._loaded = loaded  # the functions' variables live as long as the servable
        return functions

    def _load_session(self) -> tf.compat.v1.Session:
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph)
        try:
            with graph.as_default():
                tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], str(self.path))
        except Exception as e:
            session.close()
            raise LoadError(f"cannot load SavedModel {self.path}: {_first_line(e)}") from None
        return session

    def signature(self, name: str) -> meta_graph_pb2.SignatureDef:
        name = name or DEFAULT_SIGNATURE
        if name == INIT_OP_SIGNATURE:  # listed in metadata, but it initializes; there is nothing to run
            raise failed_precondition(f'Serving signature key "{name}" is the SavedModel\'s initializer, '
                                      'not a signature that can be called.')
        if name not in self.signature_defs:
            raise failed_precondition(f'Serving signature key "{name}" not found.')
        return self._checked_signatures[name]

    def run(self, signature_name: str, inputs: dict[str, np.ndarray], output_keys: list[str]) -> dict[str, np.ndarray]:
        signature = self.signature_defs[signature_name]
        if self._session is not None:
            fetches = [signature.outputs[k].name for k in output_keys]
            feeds = {signature.inputs[k].name: v for k, v in inputs.items()}
            try:
                values = self._session.run(fetches, feed_dict=feeds)
            except _MODEL_ERRORS as e:
                raise _client_error(e) from None
            return dict(zip(output_keys, values))
        try:
            result = self._functions[signature_name]({k: tf.constant(v) for k, v in inputs.items()})
        except _MODEL_ERRORS as e:
            raise _client_error(e) from None
        return {k: result[k].numpy() for k in output_keys}


# What a model raises on a client's tensor: the graph's own errors (shapes it cannot take, asserts,
# unparsable examples) and the Session's feed checks (ValueError "Cannot feed value of shape ...",
# TypeError for a value it cannot convert). TF Serving passes the session's status on
# (INVALID_ARGUMENT for these; HTTP 400 by http_server.cc's ToHTTPStatusCode); here every one of
# them is INVALID_ARGUMENT, so a client's tensor never produces a 500.
_MODEL_ERRORS = (tf.errors.OpError, ValueError, TypeError)


def _client_error(error: Exception):
    return invalid_argument(_first_line(error))


def _with_graph_shapes(signature: meta_graph_pb2.SignatureDef, graph: tf.Graph) -> meta_graph_pb2.SignatureDef:
    """`signature` with each shapeless TensorInfo given its tensor's static shape in `graph`.

    TF Serving's saved_model_half_plus_three declares x and y with no shape while the graph has
    them [?, 1]; its REST documentation's `{"instances": [1.0, 2.0, 5.0]}` answers
    `[3.5, 4.0, 5.5]`. With the graph's shape, check_inputs gives that input the [-1, 1]
    leniency (and its outputs lose the 1 again) instead of leaving it to a Python Session that
    refuses shape [3]. Tensors of unknown rank in the graph stay unchecked.
    """
    checked = meta_graph_pb2.SignatureDef()
    checked.CopyFrom(signature)
    for info in [*checked.inputs.values(), *checked.outputs.values()]:
        if info.HasField("tensor_shape") or not info.name:
            continue
        try:
            shape = graph.get_tensor_by_name(info.name).shape
        except (KeyError, ValueError):  # a sparse or composite TensorInfo: nothing to borrow
            continue
        if shape.rank is not None:
            info.tensor_shape.CopyFrom(shape.as_proto())
    return checked


def _caller(function, signature: meta_graph_pb2.SignatureDef) -> Callable[[dict], dict]:
    """Runs a loaded signature on tensors keyed by input alias.

    A signature call binds, canonicalizes and re-checks its arguments in Python on every call:
    ~0.15 ms of a 0.8 ms single-image call here. The inputs were already checked against the
    SignatureDef (check_inputs), so they go straight to the function's graph, in the order TF's
    own call would flatten them (found once, below), then its captured variables. Any other kind
    of function (or TF version) takes the plain call.
    """
    structured = lambda inputs: function(**inputs)  # noqa: E731
    try:
        graph_function = function.inference_fn
        order = _flat_input_order(graph_function.function_type, signature)
        captures = list(function.captured_inputs)
        expected = len(graph_function.cached_definition.signature.input_arg)
    except (AttributeError, TypeError, ValueError):
        return structured
    if order is None or len(order) + len(captures) != expected:
        return structured
    return lambda inputs: graph_function.call_preflattened([inputs[alias] for alias in order] + captures)


def _flat_input_order(function_type, signature: meta_graph_pb2.SignatureDef) -> list[str] | None:
    """The input aliases in the order the graph takes them: binds one probe tensor per alias
    and reads back where TF's flattening puts each."""
    probes = {}
    for alias, info in signature.inputs.items():
        shape = [] if info.tensor_shape.unknown_rank else [max(d.size, 1) for d in info.tensor_shape.dim]
        probes[alias] = tf.zeros(shape, tf.dtypes.as_dtype(info.dtype))
    flat = function_type.unpack_inputs(function_type.bind(**probes))
    alias_of = {id(tensor): alias for alias, tensor in probes.items()}
    order = [alias_of.get(id(tensor)) for tensor in flat]
    return order if None not in order and sorted(order) == sorted(probes) else None


def check_inputs(signature: meta_graph_pb2.SignatureDef, inputs: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], bool]:
    """Checks aliases, dtypes and shapes against the signature: (inputs ready to run, lenient).

    TF Serving's C++ Session accepts x of shape [3] for a [-1, 1] signature and computes on [3];
    here such an input gains the trailing 1 and `lenient` tells the caller to drop it from the
    outputs again (squeeze_lenient_outputs), so both servers answer alike.
    """
    expected = set(signature.inputs)
    for alias in inputs:
        if alias not in expected:
            raise invalid_argument(f"input tensor alias not found in signature: {alias}. "
                                   f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.")
    missing = expected - set(inputs)
    if missing:
        raise invalid_argument(f"input size does not match signature: {len(inputs)}!={len(expected)} "
                               f"len({{{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(expected))}}}). "
                               f"Sent extra: {{}}. Missing but required: {{{','.join(sorted(missing))}}}.")
    checked = {alias: _check_tensor(alias, signature.inputs[alias], value) for alias, value in inputs.items()}
    lenient = any(checked[a].ndim != np.ndim(inputs[a]) for a in checked)
    return checked, lenient


def squeeze_lenient_outputs(signature: meta_graph_pb2.SignatureDef, outputs: dict[str, np.ndarray]
                            ) -> dict[str, np.ndarray]:
    """Drops the trailing 1 that check_inputs added, from outputs declared as [..., 1]."""
    squeezed = {}
    for alias, value in outputs.items():
        dims = signature.outputs[alias].tensor_shape.dim
        ends_in_one = len(dims) == value.ndim and dims and dims[-1].size == 1 and value.shape[-1] == 1
        squeezed[alias] = value[..., 0] if ends_in_one else value
    return squeezed


def _check_tensor(alias: str, info: meta_graph_pb2.TensorInfo, value: np.ndarray) -> np.ndarray:
    want = numpy_dtype(info.dtype)
    if value.dtype != want and not (want.kind == "O" and value.dtype.kind in "SUO"):
        raise invalid_argument(f"input '{alias}' has dtype {_np_name(value.dtype)} but the signature expects "
                               f"{dtype_name(info.dtype)}; send {dtype_name(info.dtype)} values")
    if not info.HasField("tensor_shape") or info.tensor_shape.unknown_rank:
        # No shape (TF1 exports such as TF Serving's saved_model_half_plus_three) is unknown rank,
        # not a scalar: TF Serving leaves the check to the graph (run() maps its errors).
        return value
    dims = [d.size for d in info.tensor_shape.dim]
    shape = list(value.shape)
    if len(shape) == len(dims) - 1 and dims[-1] == 1:
        value, shape = value.reshape(*shape, 1), shape + [1]
    if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
        want_shape = "[" + ",".join("?" if d < 0 else str(d) for d in dims) + "]"
        raise invalid_argument(f"input '{alias}' has shape [{','.join(map(str, shape))}] but the signature "
                               f"expects {want_shape} ({dtype_name(info.dtype)})")
    return value


def _np_name(dtype: np.dtype) -> str:
    return "string" if dtype.kind in "SUO" else tf.dtypes.as_dtype(dtype).name

