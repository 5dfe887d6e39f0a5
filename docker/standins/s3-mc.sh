#!/bin/sh
# The S3 stand-in's `mc`: only `mc ready ALIAS`, the compose health check, is provided.
if [ "${1:-}" != ready ]; then
  echo "mc stand-in: only 'mc ready' exists here (the S3 server is moto, not MinIO)" >&2
  exit 2
fi
exec /opt/moto/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:9000/moto-api/', timeout=5)"
