# Stand-in for the MinIO server image (scripts/compose_check.py), where MinIO cannot be had: moto's S3
# server (the same server the tests use) on MinIO's port 9000, and an `mc` that answers MinIO's health
# check (`mc ready local`) and nothing else. It keeps objects in memory: the minio-data volume stays empty.
ARG BASE_IMAGE=fruits-standin/debian:bookworm
FROM ${BASE_IMAGE}
ARG MOTO_VERSION=5.2.5
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/moto \
 && /opt/moto/bin/pip install --no-cache-dir "moto[server]==${MOTO_VERSION}"
COPY s3-entrypoint.sh /usr/local/bin/minio
COPY s3-mc.sh /usr/bin/mc
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/minio"]
CMD ["server", "/data"]
