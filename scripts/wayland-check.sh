#!/usr/bin/env bash
# The window on Wayland, natively: a headless Weston (no X server, no XWayland), a first start
# of Atelier (fresh settings: Atelier Shapes opens), one picture generated, and a screenshot in
# screenshots/wayland.png. Needs: apt-get install -y weston mesa-vulkan-drivers
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
runtime=$(mktemp -d); chmod 700 "$runtime"
home=$(mktemp -d)
weston_pid=""; app=""
cleanup() { kill $app $weston_pid 2>/dev/null || true; rm -rf "$runtime" "$home"; }
trap cleanup EXIT
export XDG_RUNTIME_DIR=$runtime
# --debug lets weston-screenshooter take the picture; pixman renders without a GPU.
weston --backend=headless-backend.so --socket=atelier-wayland --width=1500 --height=950 \
  --use-pixman --debug --idle-time=0 >"$home/weston.log" 2>&1 &
weston_pid=$!
for _ in $(seq 50); do [ -S "$runtime/atelier-wayland" ] && break; sleep 0.1; done
unset DISPLAY   # no X11 to fall back to: winit must speak Wayland
export WAYLAND_DISPLAY=atelier-wayland HOME=$home XDG_DATA_HOME=$home/data XDG_CONFIG_HOME=$home/config
./target/release/atelier --device cpu --seed 7 --generate \
  --prompt "a large yellow star at the top left on a blue background" >"$home/atelier.log" 2>&1 &
app=$!
sleep "${WAIT_SECS:-10}"   # Atelier Shapes unpacks and loads; 20 steps at 128x128 on the CPU
if ! kill -0 $app 2>/dev/null; then
  echo "Atelier exited on Wayland:"; cat "$home/atelier.log"; exit 1
fi
(cd "$home" && weston-screenshooter)
mv "$home"/wayland-screenshot-*.png screenshots/wayland.png
echo "Atelier ran on Wayland (headless Weston $(weston --version | cut -d' ' -f2)); screenshots/wayland.png"
