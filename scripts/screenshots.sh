#!/usr/bin/env bash
# Runs the real app under Xvfb on a fixture model, drives it with xdotool, and saves screenshots
# into screenshots/. Needs: apt-get install -y xvfb xdotool imagemagick mesa-vulkan-drivers
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
display=:95
Xvfb $display -screen 0 1600x1000x24 >/dev/null 2>&1 &
xvfb=$!
home=$(mktemp -d)   # a fresh settings folder: no remembered state
cleanup() { kill "$app" "$xvfb" 2>/dev/null || true; rm -rf "$home"; }
trap cleanup EXIT
sleep 1
export DISPLAY=$display HOME=$home XDG_DATA_HOME=$home/data ATELIER_STATS=1
./target/release/atelier --model tests/fixtures/sd1/model --device cpu --seed 7 --steps 40 \
  --size 64x48 --prompt "a lighthouse on a cliff at dusk, oil painting" 2> >(tee screenshots/window-stats.txt >&2) &
app=$!
for _ in $(seq 100); do
  xdotool search --onlyvisible --name Atelier >/dev/null 2>&1 && break
  sleep 0.2
done
window=$(xdotool search --onlyvisible --name Atelier | head -1)
xdotool windowsize "$window" 1500 950
xdotool windowmove "$window" 0 0
sleep 3                                   # the fixture model loads
# Xvfb has no window manager to give keyboard focus, so click Generate (at a fixed place in
# the left panel) rather than pressing Ctrl+Enter; the kittest tests cover the shortcut.
xdotool mousemove 60 511 click 1           # Generate
sleep 0.3
xdotool mousemove 60 511 click 1           # and queue a second job
sleep "${PREVIEW_WAIT_SECS:-3}"            # mid-way through the first job
import -window root screenshots/studio-generating.png
sleep "${RESULT_WAIT_SECS:-20}"            # both jobs finish
import -window root screenshots/studio-result.png
echo "saved screenshots/studio-generating.png screenshots/studio-result.png"
