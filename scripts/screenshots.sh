#!/usr/bin/env bash
# Runs the real app under Xvfb with Atelier Shapes (the model that comes with Atelier), drives it
# with xdotool, and saves screenshots into screenshots/. Then opens a library of 10,000 sample images and scrolls its gallery, for the
# frame times. Needs: apt-get install -y xvfb xdotool imagemagick mesa-vulkan-drivers
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
display=:95
Xvfb $display -screen 0 1600x1000x24 >/dev/null 2>&1 &
xvfb=$!
home=$(mktemp -d)   # a fresh settings folder: no remembered state
app=""
cleanup() { kill $app "$xvfb" 2>/dev/null || true; rm -rf "$home"; }
trap cleanup EXIT
for _ in $(seq 100); do [ -e /tmp/.X11-unix/X95 ] && break; sleep 0.1; done   # Xvfb is up
export DISPLAY=$display HOME=$home XDG_DATA_HOME=$home/data ATELIER_STATS=1

# Starts the app with the given arguments and sizes its window.
start_app() {
  ./target/release/atelier "$@" 2> >(tee -a screenshots/window-stats.txt >&2) &
  app=$!
  for _ in $(seq 100); do
    xdotool search --onlyvisible --name Atelier >/dev/null 2>&1 && break
    sleep 0.2
  done
  window=$(xdotool search --onlyvisible --name Atelier | head -1)
  xdotool windowsize "$window" 1500 950
  xdotool windowmove "$window" 0 0
}

: > screenshots/window-stats.txt
# A library with pictures of Atelier Shapes (the model that comes with Atelier), made on the
# command line and imported, as an artist's earlier work would be.
mkdir -p "$home/made"
index=0
for prompt in "a large red circle on a green background" "a small white ring at the top right on a black background" \
  "a large purple triangle on a textured yellow background" "a blue square and an orange star on a white background" \
  "a large pink star on a gray background" "a green ring on a red to yellow gradient background" \
  "a large black square on a textured pink background" "a yellow circle and a blue triangle on a brown background" \
  "a small orange star on a purple background" "a large white circle on a blue to black gradient background"; do
  index=$((index + 1))
  ./target/release/atelier generate --device cpu --prompt "$prompt" --seed $((index * 11)) --steps 20 \
    --scheduler dpmpp-2m --guidance 5 --out "$home/made/$index.png" >/dev/null 2>&1
done
mkdir -p "$home/library"
./target/release/atelier gallery import --library "$home/library" "$home/made"/*.png >/dev/null
# A first start (no model chosen): Atelier Shapes opens; --generate presses Generate once it has.
start_app --device cpu --seed 7 --steps 60 --library "$home/library" --generate \
  --prompt "a large yellow star on a blue background"
sleep "${PREVIEW_WAIT_SECS:-3}"            # mid-way through the job: the live preview
import -window root screenshots/studio-generating.png
sleep "${RESULT_WAIT_SECS:-12}"            # the job finishes
import -window root screenshots/studio-result.png
xdotool mousemove 97 12 click 1            # the Gallery tab
sleep 1
xdotool mousemove 80 175 click 1           # the newest image
sleep 1
import -window root screenshots/gallery.png
kill $app; app=""
sleep 1

# 10,000 images: open the gallery and scroll through it.
./target/release/atelier gallery bench --count 10000 --keep "$home/big" >/dev/null
start_app --library "$home/big"
sleep 2
xdotool mousemove 97 12 click 1            # the Gallery tab
sleep 2
xdotool mousemove 600 500
for _ in $(seq 60); do xdotool click 5; sleep 0.05; done   # scroll down
for _ in $(seq 20); do xdotool click 4; sleep 0.05; done   # and back up a little
sleep 1
import -window root screenshots/gallery-10000.png
kill $app; app=""
sleep 1

# A comparison made on the command line, reopened in the window from the gallery.
./target/release/atelier compare --device cpu --prompt "a large pink ring on a green background" \
  --scheduler euler,euler-a,dpmpp-2m-karras,unipc,dpm2 --steps 5,10,20 --seed 7 --guidance 5 \
  --width 128 --height 128 --library "$home/cmp" --out screenshots/compare-grid.png 2>/dev/null
start_app --device cpu --library "$home/cmp"
sleep 3
xdotool mousemove 97 12 click 1            # the Gallery tab
sleep 1
xdotool mousemove 80 175 click 1           # a cell of the comparison
sleep 1
xdotool mousemove 1400 149 click 1         # Open comparison
sleep 1.5
import -window root screenshots/compare.png
kill $app; app=""
echo "saved screenshots/studio-generating.png studio-result.png gallery.png gallery-10000.png compare.png compare-grid.png"
