#!/usr/bin/env bash
# The window's frame time while scrolling a large library, under Xvfb: writes COUNT sample PNGs
# (default 100,000), opens them in the Gallery tab, scrolls with the wheel, then drags the
# scroll bar from the top to the bottom of the whole library, and prints eframe's whole-frame
# CPU time (mean and max over the Gallery tab's frames). Screenshot: screenshots/gallery-scrolled.png
# Needs: apt-get install -y xvfb xdotool imagemagick mesa-vulkan-drivers
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
cargo build --release
display=:97
Xvfb $display -screen 0 1600x1000x24 >/dev/null 2>&1 &
xvfb=$!
home=$(mktemp -d)
app=""
cleanup() { kill $app "$xvfb" 2>/dev/null || true; rm -rf "$home"; }
trap cleanup EXIT
for _ in $(seq 100); do [ -e /tmp/.X11-unix/X97 ] && break; sleep 0.1; done   # Xvfb is up
export DISPLAY=$display HOME=$home XDG_DATA_HOME=$home/data ATELIER_STATS=1
./target/release/atelier gallery bench --count "$count" --keep "$home/big" | tail -3
./target/release/atelier --library "$home/big" --device cpu 2>"$home/stats.txt" &
app=$!
for _ in $(seq 100); do
  xdotool search --onlyvisible --name Atelier >/dev/null 2>&1 && break
  sleep 0.2
done
window=$(xdotool search --onlyvisible --name Atelier | head -1)
xdotool windowsize "$window" 1500 950
xdotool windowmove "$window" 0 0
sleep 3
xdotool mousemove 97 12 click 1            # the Gallery tab
sleep 3                                    # the library opens; the results stream in
xdotool mousemove 600 500
for _ in $(seq 100); do xdotool click 5; sleep 0.03; done   # the wheel, down
# The scroll bar (at the grid's right edge) from the top to the bottom: the whole library.
xdotool mousemove 1482 107 mousedown 1
for y in $(seq 107 8 905); do xdotool mousemove 1482 "$y"; sleep 0.02; done
xdotool mouseup 1
sleep 1
import -window root screenshots/gallery-scrolled.png
kill $app; app=""
sleep 0.5
grep "^gallery:" "$home/stats.txt" | tail -1
