#!/bin/sh
# Init container of the serving pods: blocks until every model in the config file ($1) has a
# complete version, i.e. a numeric folder under its base_path holding saved_model.pb. Exports
# are staged under a hidden name and renamed into place, so a numeric folder is complete.
# Why: tensorflow_model_server opens no port until every configured model has loaded a version
# (server.cc BuildAndStart: ServerCore::Create, which awaits the initial loads, runs before
# AddListeningPort), so while training runs its probes would fail and restart it in a loop.
# Probes do not run during init containers; this one waits as long as training takes.
set -eu
config="$1"
poll_seconds="${2:-10}"
base_paths=$(sed -n 's/^[[:space:]]*base_path:[[:space:]]*"\([^"]*\)".*/\1/p' "$config")
if [ -z "$base_paths" ]; then
  echo "no base_path in $config" >&2
  exit 1
fi
for base in $base_paths; do
  case "$base" in
    *://*)  # an object store: not visible from here (k8s/README.md, step 4)
      echo "cannot look into $base from this container: not waiting for it"
      continue ;;
  esac
  until ls -d "$base"/*/saved_model.pb 2>/dev/null | grep -Eq '/[0-9]+/saved_model\.pb$'; do
    echo "waiting for a version under $base (a numeric folder with saved_model.pb)"
    sleep "$poll_seconds"
  done
  echo "found a version under $base"
done
