#!/usr/bin/env bash
# Install or remove medge on a Debian/Ubuntu edge box (docs/operations.md).
#
#   scripts/install.sh install      # what `make install` runs
#   scripts/install.sh uninstall    # what `make uninstall` runs; PURGE=1 also removes data
#
# DESTDIR  staging root (packaging, tests); users, ownership and systemctl are skipped under it
# PREFIX   the venv with medge in it (default /opt/medge): ExecStart is $PREFIX/bin/medge
# MEDGE_SKIP_VENV=1  lay out everything but the venv (tests)
#
# Configs in /etc/medge are never overwritten: a locally edited file stays and the new shipped
# version lands beside it as FILE.dist. Uninstall keeps edited configs and /var/lib/medge
# (outboxes, spools: data not yet delivered) unless PURGE=1.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/medge}
SYSCONFDIR=/etc/medge
STATEDIR=/var/lib/medge
UNITDIR=/etc/systemd/system
UDEVDIR=/etc/udev/rules.d
SYSUSERSDIR=/usr/lib/sysusers.d
SHARE=$PREFIX/share/medge
MANIFEST=$SHARE/manifest
PRISTINE=$SHARE/config-dist
USER_NAME=medge

root() { printf '%s%s' "$DESTDIR" "$1"; }
say() { echo "install: $*"; }
live() { [ -z "$DESTDIR" ]; }
have_systemd() { live && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# put SOURCE at PATH (a path on the target system) with MODE; record it for uninstall
put() {
    local source=$1 path=$2 mode=$3
    install -D -m "$mode" "$source" "$(root "$path")"
    echo "$path" >> "$(root "$MANIFEST").new"
}

# installed configs keep their state in the directory their unit provides and may write
# (StateDirectory=medge/NAME; ProtectSystem=strict makes everything else read-only)
shipped_config() {
    local source=$1 state_name=$2
    if [ -n "$state_name" ]; then
        sed -e "s|^state_dir = .*|state_dir = \"$STATEDIR/$state_name\"|" \
            -e "s|^spool_dir = .*|spool_dir = \"$STATEDIR/$state_name/pacs-spool\"|" "$source"
    else
        cat "$source"
    fi
}

# a config file: new -> installed; unchanged -> left; edited locally -> new version as .dist
put_config() {
    local source=$1 name=$2 state_name=${3:-}
    local target pristine tmp
    target=$(root "$SYSCONFDIR/$name")
    pristine=$(root "$PRISTINE/$name")
    tmp=$(mktemp)
    shipped_config "$source" "$state_name" > "$tmp"
    install -d -m 0750 "$(dirname "$target")"
    if [ ! -e "$target" ]; then
        install -m 0640 "$tmp" "$target"
    elif cmp -s "$target" "$tmp"; then
        rm -f "$target.dist"
    elif [ -e "$pristine" ] && cmp -s "$target" "$pristine"; then
        install -m 0640 "$tmp" "$target"          # not edited here: take the new version
    else
        install -m 0640 "$tmp" "$target.dist"
        say "kept your $SYSCONFDIR/$name; the shipped version is $SYSCONFDIR/$name.dist"
    fi
    install -D -m 0644 "$tmp" "$pristine"
    echo "$PRISTINE/$name" >> "$(root "$MANIFEST").new"
    rm -f "$tmp"
    live && chgrp "$USER_NAME" "$target" 2>/dev/null || true
}

install_venv() {
    if [ "${MEDGE_SKIP_VENV:-0}" = 1 ]; then
        say "skipping the venv (MEDGE_SKIP_VENV=1)"
        return
    fi
    local venv
    venv=$(root "$PREFIX")
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q --upgrade "$REPO"
    say "medge $("$venv/bin/medge" --version | cut -d' ' -f2) in $PREFIX"
}

create_user() {
    if ! live; then
        return  # the sysusers.d file creates it when the staged tree is installed
    fi
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$SYSUSERSDIR/medge.conf"
    elif ! id "$USER_NAME" >/dev/null 2>&1; then
        useradd --system --home-dir "$STATEDIR" --shell /usr/sbin/nologin "$USER_NAME"
        usermod -a -G dialout "$USER_NAME"
    fi
}

do_install() {
    local unit
    mkdir -p "$(root "$SHARE")"
    : > "$(root "$MANIFEST").new"
    install_venv

    for unit in "$REPO"/systemd/*.service; do
        install -d "$(root "$UNITDIR")"
        sed "s|/opt/medge|$PREFIX|g" "$unit" > "$(root "$UNITDIR")/$(basename "$unit")"
        chmod 0644 "$(root "$UNITDIR")/$(basename "$unit")"
        echo "$UNITDIR/$(basename "$unit")" >> "$(root "$MANIFEST").new"
    done
    put "$REPO/config/udev/99-medge.rules" "$UDEVDIR/99-medge.rules" 0644
    put "$REPO/scripts/sysusers-medge.conf" "$SYSUSERSDIR/medge.conf" 0644
    for doc in architecture operations security safety telemetry; do
        [ -e "$REPO/docs/$doc.md" ] && put "$REPO/docs/$doc.md" "$PREFIX/share/doc/medge/$doc.md" 0644
    done
    for file in "$REPO"/config/mosquitto/*; do
        put "$file" "$SHARE/mosquitto/$(basename "$file")" 0644
    done
    create_user

    install -d -m 0750 "$(root "$SYSCONFDIR")"
    # the box's key is made here by the medge user (medge pki request) and read only by it
    install -d -m 0700 "$(root "$SYSCONFDIR/tls")"
    put_config "$REPO/config/gateway.toml" gateway-main.toml gateway-main
    for daemon in microscope manipulator; do
        [ -e "$REPO/config/$daemon.toml" ] && put_config "$REPO/config/$daemon.toml" "$daemon.toml" "$daemon"
    done
    [ -e "$REPO/config/objectives.toml" ] && put_config "$REPO/config/objectives.toml" objectives.toml
    # PACS destinations for the microscope (enable with pacs_file = "pacs.toml")
    [ -e "$REPO/config/orthanc/pacs.example.toml" ] && \
        put_config "$REPO/config/orthanc/pacs.example.toml" pacs.toml microscope
    for map in "$REPO"/config/ventilators/*.toml; do
        put_config "$map" "ventilators/$(basename "$map")"
    done
    install -d -m 0750 "$(root "$STATEDIR")"
    if live; then
        chown root:"$USER_NAME" "$(root "$SYSCONFDIR")"
        chown "$USER_NAME:$USER_NAME" "$(root "$SYSCONFDIR/tls")"
        chown "$USER_NAME:$USER_NAME" "$(root "$STATEDIR")"
    fi

    sort -u "$(root "$MANIFEST").new" > "$(root "$MANIFEST")"
    rm -f "$(root "$MANIFEST").new"
    if have_systemd; then
        systemctl daemon-reload
        command -v udevadm >/dev/null && udevadm control --reload || true
    fi
    say "done. Next: edit $SYSCONFDIR/gateway-main.toml, then systemctl enable --now medge-gateway@main"
}

do_uninstall() {
    local path target pristine name
    if [ ! -e "$(root "$MANIFEST")" ]; then
        say "nothing to remove: no $MANIFEST"
        return 0
    fi
    if have_systemd; then
        systemctl disable --now 'medge-gateway@*.service' medge-microscope.service \
            medge-manipulator.service 2>/dev/null || true
    fi
    # configs: remove the ones nobody edited (Debian's remove/purge convention)
    while IFS= read -r path; do
        case "$path" in
            "$PRISTINE"/*)
                name=${path#"$PRISTINE"/}
                target=$(root "$SYSCONFDIR/$name")
                pristine=$(root "$path")
                rm -f "$target.dist"
                if [ "${PURGE:-0}" = 1 ] || { [ -e "$target" ] && cmp -s "$target" "$pristine"; }; then
                    rm -f "$target"
                elif [ -e "$target" ]; then
                    say "kept your edited $SYSCONFDIR/$name"
                fi ;;
            *) rm -f "$(root "$path")" ;;
        esac
    done < "$(root "$MANIFEST")"
    rm -rf "$(root "$PREFIX")"
    find "$(root "$SYSCONFDIR")" -depth -type d -empty -delete 2>/dev/null || true
    if [ "${PURGE:-0}" = 1 ]; then
        rm -rf "$(root "$SYSCONFDIR")" "$(root "$STATEDIR")"
        if live && id "$USER_NAME" >/dev/null 2>&1; then userdel "$USER_NAME" || true; fi
        say "purged configs, data ($STATEDIR) and the $USER_NAME user"
    else
        say "kept $STATEDIR (undelivered data, outboxes); PURGE=1 removes it"
    fi
    have_systemd && systemctl daemon-reload || true
}

case "${1:-}" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
