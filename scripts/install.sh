#!/usr/bin/env bash
# Installs Skein on a Linux host: the `skein` binary, a default config, and (unless
# --no-systemd) a `skein` system user, its data directory and a systemd unit.
#
#   scripts/install.sh [--prefix DIR] [--binary PATH] [--data-dir DIR] [--no-systemd]
#
#   --prefix DIR     install under DIR (default /usr/local): DIR/bin/skein; the config goes to
#                    /etc/skein and the data to /var/lib/skein for /usr and /usr/local, else to
#                    DIR/etc/skein and DIR/var/lib/skein
#   --binary PATH    install this binary instead of building one (cargo build --release)
#   --data-dir DIR   the data directory written into the config
#   --no-systemd     no user, no unit installed into /etc/systemd (the unit file is still written
#                    to DIR/share/skein/skein.service for reference); needs no root
#
# It runs `skein broker --check` on the installed config before anything is enabled and stops
# on a failed check. An existing config is never overwritten (the new one is written beside it
# as skein.toml.new).
set -euo pipefail

prefix=/usr/local
binary=""
data_dir=""
systemd=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        --data-dir) data_dir="$2"; shift 2 ;;
        --no-systemd) systemd=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "$binary" ]]; then
    echo "building skein (cargo build --release -p skein-cli)"
    (cd "$here" && cargo build --release -p skein-cli)
    binary="$here/target/release/skein"
fi
[[ -x "$binary" ]] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }

prefix="$(mkdir -p "$prefix" && cd "$prefix" && pwd)"
case "$prefix" in
    /usr|/usr/local) config_dir=/etc/skein; default_data=/var/lib/skein ;;
    *) config_dir="$prefix/etc/skein"; default_data="$prefix/var/lib/skein" ;;
esac
data_dir="${data_dir:-$default_data}"
config="$config_dir/skein.toml"

if [[ $systemd -eq 1 && $EUID -ne 0 ]]; then
    echo "install.sh: installing the systemd unit and user needs root (or pass --no-systemd)" >&2
    exit 1
fi

install -D -m 0755 "$binary" "$prefix/bin/skein"
echo "installed $prefix/bin/skein ($("$prefix/bin/skein" --version))"

mkdir -p "$config_dir" "$data_dir"
# The default config is what the binary itself prints, with this host's paths; a clean
# environment so that the installer's own SKEIN_* variables do not end up in the file.
target="$config"
[[ -e "$config" ]] && target="$config.new"
{
    echo "# Skein broker settings (skein broker --config $config)."
    echo "# Every key, its default and meaning: README 'Deploying'. Environment variables"
    echo "# SKEIN_<SECTION>_<KEY> override this file; flags override both."
    env -i PATH="$PATH" "$prefix/bin/skein" broker --print-config \
        --data-dir "$data_dir" --listen 127.0.0.1:9400 --metrics-listen 127.0.0.1:9401
} > "$target"
echo "wrote $target"

echo "checking the host (skein broker --check):"
if ! env -i PATH="$PATH" "$prefix/bin/skein" broker --config "$config" --check; then
    echo "install.sh: a pre-start check failed; fix it (see above) and run install.sh again" >&2
    exit 1
fi

unit_dir="$prefix/share/skein"
mkdir -p "$unit_dir"
sed -e "s|@BIN@|$prefix/bin/skein|g" -e "s|@CONFIG@|$config|g" \
    "$here/scripts/deploy/skein.service" > "$unit_dir/skein.service"
echo "wrote $unit_dir/skein.service"

if [[ $systemd -eq 1 ]]; then
    if ! id skein >/dev/null 2>&1; then
        useradd --system --home-dir "$data_dir" --no-create-home --shell /usr/sbin/nologin skein
        echo "created the system user skein"
    fi
    chown -R skein:skein "$data_dir"
    install -m 0644 "$unit_dir/skein.service" /etc/systemd/system/skein.service
    systemctl daemon-reload
    echo "installed /etc/systemd/system/skein.service; start it with: systemctl enable --now skein"
fi
