#!/bin/sh
# The aekit image's entrypoint. An aekit subcommand runs as given (the training Job's args
# start with `train`); anything else starts the server the way the official tensorflow/serving
# image's tf_serving_entrypoint.sh does: gRPC on 8500, REST on 8501, the model MODEL_NAME under
# MODEL_BASE_PATH, extra flags appended. So the image drops into TF Serving's own Kubernetes guide.
set -eu
case "${1:-}" in
  train|export|evaluate|serve|client|plot|loadtest|demo|release|-h|--help)
    exec aekit "$@" ;;
esac
exec aekit serve --port="${GRPC_PORT:-8500}" --rest_api_port="${PORT:-8501}" \
  --model_name="${MODEL_NAME:-model}" --model_base_path="${MODEL_BASE_PATH:-/models}/${MODEL_NAME:-model}" "$@"
