#!/usr/bin/env bash
# The README's test command. Installs what it needs on a fresh Debian
# machine (tshark for capture checks, a Python venv with pymodbus for the
# third-party master and rusty-bacnet for the BACnet/SC peer), then runs the
# Rust tests and the scenario suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v tshark >/dev/null || need+=(tshark)
# The reference D-Bus broker (hilbench air --broker dbus-daemon) and libdbus's
# dbus-send, an independent client of the air's own bus (tests/air_bus.rs).
command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
command -v dbus-send >/dev/null || need+=(dbus-bin)
# jq and busctl: the --help examples use them, and tests/examples.rs runs every example.
command -v jq >/dev/null || need+=(jq)
command -v busctl >/dev/null || need+=(systemd)
# bluetoothctl, the reference BlueZ client (tests/air_bluetoothctl.rs). The
# package also brings bluetoothd, which nothing starts here: the tests use
# the air's own bus, and there is no kernel controller.
command -v bluetoothctl >/dev/null || need+=(bluez)
# The 32-bit C library for Zephyr's own SMP server, a native_sim (i386) binary
# (tests/smp_zephyr_differential.rs).
dpkg -s libc6:i386 >/dev/null 2>&1 || need+=(libc6:i386)
if ((${#need[@]})); then
  echo "== installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
  if [[ " ${need[*]} " == *" libc6:i386 "* ]] && ! dpkg --print-foreign-architectures | grep -qx i386; then
    $SUDO dpkg --add-architecture i386
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

venv=target/venv
if ! "$venv/bin/python" -c 'import pymodbus, serial, rusty_bacnet, bleak, smpclient, smpmgr, mcumgr_toolkit, aioshelly' 2>/dev/null; then
  echo "== creating Python venv with third-party clients in $venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r ci/requirements.txt
fi
export HILBENCH_PYTHON="$PWD/$venv/bin/python"

# Zephyr 4.4.0's smp_svr built for native_sim (serial and UDP), from the smpclient 7.3.0
# source package on PyPI: fetched here, checked, never committed.
zephyr=target/zephyr-smp
zephyr_exe=zephyr_4.4.0_smp_server_0eae053d_native_sim_serial.exe
zephyr_udp=zephyr_4.4.0_smp_server_0eae053d_native_sim_udp.exe
zephyr_sums="3f0ed0fdc2dd9193b48df7069acc47dc6ce136856b3633c8d776844b11612b10  $zephyr/$zephyr_exe
9affd08d35402b94b3f0b75dd3bfd31616151c5016bc00fcc58f8f2207a3600f  $zephyr/$zephyr_udp"
if ! echo "$zephyr_sums" | sha256sum -c --status 2>/dev/null; then
  echo "== fetching Zephyr's own SMP server, serial and UDP builds (smpclient 7.3.0 sdist from PyPI) into $zephyr"
  mkdir -p "$zephyr"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$zephyr" smpclient==7.3.0
  echo "86aa4bc1c621805d97f449793a4077f049aa88a98a1e916bf59423d072bd2a3b  $zephyr/smpclient-7.3.0.tar.gz" | sha256sum -c --quiet
  for exe in "$zephyr_exe" "$zephyr_udp"; do
    tar -xzf "$zephyr/smpclient-7.3.0.tar.gz" -C "$zephyr" --strip-components=4 "smpclient-7.3.0/tests/fixtures/smp-server/$exe"
    chmod +x "$zephyr/$exe"
  done
  echo "$zephyr_sums" | sha256sum -c --quiet
fi

# One build of the dependency tree: the tests and the scenario suite both use
# the dev profile (Cargo.toml: our crate at opt-level 1, dependencies at 2),
# so CI never builds the tree a second time in release.
echo "== tests (dev profile; builds the hilbench binary the scenarios use)"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi

hilbench=${CARGO_TARGET_DIR:-target}/debug/hilbench
# The two folders run side by side, each `hilbench run` with its own virtual air and
# ports: one after the other they took 4.4 min of mostly waiting (timeouts, Python
# start-up, simulated boot times); together about as long as the longer one.
echo "== scenarios, and scenarios with third-party clients (pymodbus, bleak, smpclient, aioshelly from the venv), side by side"
"$hilbench" run scenarios/ --junit target/junit.xml --capture target/captures >target/scenarios.log 2>&1 &
own=$!
"$hilbench" run scenarios/third-party/ --junit target/junit-third-party.xml --capture target/captures >target/scenarios-third-party.log 2>&1 &
third=$!
rc=0
wait "$own" || rc=1
wait "$third" || rc=1
echo "== scenarios"
cat target/scenarios.log
echo "== scenarios with third-party clients"
cat target/scenarios-third-party.log
exit "$rc"
