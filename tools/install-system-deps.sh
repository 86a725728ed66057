#!/usr/bin/env bash
# Debian packages the bench needs: RabbitMQ, tinyproxy (one per moto instance), wrk (the ceiling),
# openssl (the apiserver's certificates), Go (the control plane is built from Go modules).
# Installs only what is missing, so a warm machine pays nothing.
set -euo pipefail
need=()
command -v tinyproxy >/dev/null || need+=(tinyproxy)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v wrk >/dev/null || need+=(wrk)
command -v openssl >/dev/null || need+=(openssl)
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || need+=(golang-go)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  # Services never start on install here (and must not: the bench starts its own on loopback).
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
