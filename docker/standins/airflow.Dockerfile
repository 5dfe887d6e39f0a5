# Stand-in for the official Airflow image, for machines that cannot pull it (scripts/compose_check.py).
# Built FROM a Debian base made from packages; it provides what docker/Dockerfile and docker-compose.yml
# rely on in the official image, and nothing more:
#   - the `airflow` user (uid 50000, gid 0) and AIRFLOW_HOME=/opt/airflow, group-writable for any uid;
#   - Airflow (with the Postgres extra, as the official image has) in a virtualenv at /home/airflow/.local
#     that is first on PATH, so `python` and `pip install` work as the `airflow` user;
#   - an entrypoint that runs `airflow db migrate` (_AIRFLOW_DB_MIGRATE) and creates the admin user
#     (_AIRFLOW_WWW_USER_CREATE) when asked, runs `bash ...`/`python ...` as given, and anything else as
#     an `airflow` subcommand (`api-server`, `scheduler`, ...);
#   - Python 3.11 (Debian bookworm's python3) and curl (the compose health checks use it).
ARG BASE_IMAGE=fruits-standin/debian:bookworm
FROM ${BASE_IMAGE}
ARG AIRFLOW_VERSION=3.3.2

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates dumb-init procps \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --uid 50000 --gid 0 --home-dir /home/airflow --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/airflow/dags /opt/airflow/logs /opt/airflow/plugins \
 && chown -R airflow:0 /opt/airflow /home/airflow \
 && chmod -R g+rwX /opt/airflow /home/airflow \
 && chmod g+w /etc/passwd

ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW_USER_HOME_DIR=/home/airflow \
    PATH=/home/airflow/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER airflow
RUN python3 -m venv /home/airflow/.local \
 && pip install --no-cache-dir "apache-airflow[postgres]==${AIRFLOW_VERSION}" \
 && airflow version

COPY airflow-entrypoint.sh /entrypoint
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]
CMD []
