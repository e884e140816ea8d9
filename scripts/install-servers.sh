#!/usr/bin/env bash
# Installs the Debian packages the tests need, when missing: the real servers the tests
# start on free loopback ports (mosquitto, influxdb, victoria-metrics, postgresql), mosquitto-clients
# for the flood benchmark, socat for
# the Modbus RTU pseudo-terminal tests, python3-venv for the virtual environment, and chromium
# for the dashboard's browser tests (driven by Playwright, which uses Debian's binary).
set -euo pipefail

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v influxd >/dev/null || need+=(influxdb)
command -v victoria-metrics >/dev/null || need+=(victoria-metrics)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v socat >/dev/null || need+=(socat)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${need[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "not root: run 'sudo apt-get install ${need[*]}' and try again" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
