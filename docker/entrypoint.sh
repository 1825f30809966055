#!/bin/sh
# Container entrypoint: fill every unset secret-bearing variable from the installation's
# secrets volume (written once by the `secrets` service), then run the command.
set -eu
dir="${QUINTET_SECRETS_DIR:-/run/quintet-secrets}"
secret() { cat "$dir/$1"; }
if [ -d "$dir" ]; then
  : "${DJANGO_SECRET_KEY:=$(secret django_secret_key)}"
  : "${METRICS_BEARER_TOKEN:=$(secret metrics_bearer_token)}"
  : "${TELEGRAM_WEBHOOK_SECRET:=$(secret telegram_webhook_secret)}"
  : "${VMCONTROL_ENROLL_SECRET:=$(secret vmcontrol_enroll_secret)}"
  : "${DATABASE_URL:=postgres://quintet:$(secret postgres_password)@postgres:5432/quintet}"
  : "${REDIS_URL:=redis://:$(secret redis_password)@redis:6379/0}"
  : "${CELERY_BROKER_URL:=amqp://quintet:$(secret rabbitmq_password)@rabbitmq:5672//}"
  export DJANGO_SECRET_KEY METRICS_BEARER_TOKEN TELEGRAM_WEBHOOK_SECRET VMCONTROL_ENROLL_SECRET \
    DATABASE_URL REDIS_URL CELERY_BROKER_URL
fi
exec "$@"
