"""aekit serving: an embedded model server speaking TensorFlow Serving's gRPC and REST protocol."""
