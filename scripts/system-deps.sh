#!/bin/sh
# System packages the tests need (Debian): a real Mosquitto broker and its clients, openssl for TLS
# certificates, systemd's analyze and socket-activate tools, Prometheus and Chromium for the fleet page.
set -eu
need=""
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need="$need mosquitto"
command -v mosquitto_pub >/dev/null 2>&1 || need="$need mosquitto-clients"
command -v openssl >/dev/null 2>&1 || need="$need openssl"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
# the Ansible test: a throwaway Debian root, booted with systemd-nspawn, reached over ssh
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need="$need debootstrap"
command -v systemd-nspawn >/dev/null 2>&1 || need="$need systemd-container"
command -v ssh >/dev/null 2>&1 || need="$need openssh-client"
# the arm64 deployment test and make wheelhouse ARCH=aarch64: a cross compiler for llama-cpp-python,
# and qemu to run the arm64 Debian root (the test registers binfmt_misc itself and undoes it after)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need="$need g++-aarch64-linux-gnu"
command -v qemu-aarch64-static >/dev/null 2>&1 || need="$need qemu-user-static"
# the fleet dashboard tests: a real Prometheus (and promtool) and a headless browser
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
[ -z "$need" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing:$need"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $need
