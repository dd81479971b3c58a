"""TF Serving's text-format config files: model config, batching, monitoring, SSL.

ModelServerConfig comes from tensorflow-serving-api's generated protos. That package does not
ship BatchingParameters (session_bundle_config.proto), MonitoringConfig or SSLConfig, so those
three messages are declared here field-for-field as in TF Serving's .proto files (same names,
numbers and types), which lets protobuf's own text_format parse the very files TF Serving reads.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto


class ConfigFileError(ValueError):
    """A config file that does not parse; the message starts like TF Serving's."""


def _declare(package: str, messages: dict[str, list[tuple]]) -> dict[str, type]:
    """Builds message classes from (name, number, type, label, type_name) field tuples."""
    file = descriptor_pb2.FileDescriptorProto(name=f"aekit/{package.replace('.', '/')}.proto",
                                              package=package, syntax="proto3",
                                              dependency=["google/protobuf/wrappers.proto"])
    for message_name, fields in messages.items():
        message = file.message_type.add(name=message_name)
        for name, number, ftype, label, type_name in fields:
            field = message.field.add(name=name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in messages}


_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_I64 = (_F.TYPE_MESSAGE, _OPT, ".google.protobuf.Int64Value")
_MESSAGES = _declare("tensorflow.serving", {
    # tensorflow_serving/servables/tensorflow/session_bundle_config.proto
    "BatchingParameters": [
        ("max_batch_size", 1, *_I64), ("batch_timeout_micros", 2, *_I64),
        ("max_enqueued_batches", 3, *_I64), ("num_batch_threads", 4, *_I64),
        ("thread_pool_name", 5, _F.TYPE_MESSAGE, _OPT, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, _REP, None),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _OPT, None),
        ("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, _OPT, ".google.protobuf.BoolValue"),
    ],
    # tensorflow_serving/config/monitoring_config.proto
    "PrometheusConfig": [("enable", 1, _F.TYPE_BOOL, _OPT, None), ("path", 2, _F.TYPE_STRING, _OPT, None)],
    "MonitoringConfig": [("prometheus_config", 1, _F.TYPE_MESSAGE, _OPT, ".tensorflow.serving.PrometheusConfig")],
    # tensorflow_serving/config/ssl_config.proto
    "SSLConfig": [("server_key", 1, _F.TYPE_STRING, _OPT, None), ("server_cert", 2, _F.TYPE_STRING, _OPT, None),
                  ("custom_ca", 3, _F.TYPE_STRING, _OPT, None), ("client_verify", 4, _F.TYPE_BOOL, _OPT, None)],
})
BatchingParameters = _MESSAGES["BatchingParameters"]
MonitoringConfig = _MESSAGES["MonitoringConfig"]
SSLConfig = _MESSAGES["SSLConfig"]
ModelServerConfig = model_server_config_pb2.ModelServerConfig


def parse_text(path: str | Path, message_class: type):
    """Parses a text-format proto file; errors read like TF Serving's."""
    path = Path(path)
    full_name = message_class.DESCRIPTOR.full_name
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigFileError(f"Error reading {full_name} file {path}: {e.strerror}") from None
    try:
        return text_format.Parse(text, message_class())
    except text_format.ParseError as e:
        raise ConfigFileError(f"Error parsing text-format {full_name}: {path}: {e}") from None


def parse_model_config_text(text: str) -> model_server_config_pb2.ModelServerConfig:
    try:
        return text_format.Parse(text, ModelServerConfig())
    except text_format.ParseError as e:
        raise ConfigFileError(f"Error parsing text-format tensorflow.serving.ModelServerConfig: {e}") from None


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """What --model_name/--model_base_path mean: one model, latest version."""
    config = ModelServerConfig()
    config.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
    return config


def prometheus_path(monitoring_config) -> str | None:
    """The metrics URL path, or None when Prometheus export is not enabled."""
    if monitoring_config is None or not monitoring_config.prometheus_config.enable:
        return None
    return monitoring_config.prometheus_config.path or "/monitoring/prometheus/metrics"
