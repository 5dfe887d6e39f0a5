#!/usr/bin/env bash
# The official Airflow image's entrypoint, reduced to what docker-compose.yml relies on.
set -euo pipefail

# Any uid (compose's `user: AIRFLOW_UID:0`) gets a passwd entry and the airflow home, as upstream does.
if ! whoami >/dev/null 2>&1 && [[ -w /etc/passwd ]]; then
  echo "default:x:$(id -u):0:default user:${AIRFLOW_USER_HOME_DIR}:/sbin/nologin" >>/etc/passwd
fi
export HOME="${AIRFLOW_USER_HOME_DIR}"

if [[ -n "${_AIRFLOW_DB_MIGRATE:-}" ]]; then
  airflow db migrate
fi
if [[ -n "${_AIRFLOW_WWW_USER_CREATE:-}" ]]; then
  # Only the FAB auth manager has users in the database; the simple auth manager reads its users
  # from AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS.
  if airflow users --help >/dev/null 2>&1; then
    airflow users create --username "${_AIRFLOW_WWW_USER_USERNAME:-admin}" \
      --password "${_AIRFLOW_WWW_USER_PASSWORD:-admin}" --firstname Airflow --lastname Admin \
      --email admin@example.com --role Admin || true
  fi
fi

case "${1:-}" in
  "") exec /bin/bash ;;
  bash) shift; exec /bin/bash "$@" ;;
  python) shift; exec python "$@" ;;
  airflow) shift; exec airflow "$@" ;;
  *) exec airflow "$@" ;;
esac
