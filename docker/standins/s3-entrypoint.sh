#!/bin/sh
# Takes MinIO's command line (`server DIR [--console-address :PORT]`) and serves S3 on :9000 with moto.
[ "${1:-}" = server ] || { echo "S3 stand-in: expected MinIO's 'server DIR ...' command, got: $*" >&2; exit 2; }
exec /opt/moto/bin/moto_server -H 0.0.0.0 -p 9000
