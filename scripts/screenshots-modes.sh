#!/usr/bin/env bash
# Screenshots of the modes in the real window under Xvfb: image to image, a mask painted with the
# mouse, the inpainted result, and outpainting, on the fixture model (random weights: the
# pictures it makes are noise; what the screenshots show is the window's work).
# Needs: apt-get install -y xvfb xdotool imagemagick mesa-vulkan-drivers
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
display=:96
Xvfb $display -screen 0 1600x1000x24 >/dev/null 2>&1 &
xvfb=$!
home=$(mktemp -d)
app=""
cleanup() { kill $app "$xvfb" 2>/dev/null || true; rm -rf "$home"; }
trap cleanup EXIT
sleep 1
export DISPLAY=$display HOME=$home XDG_DATA_HOME=$home/data

# The picture to work on: a sky, a sun, a mountain and a red barn.
scene=$home/scene.png
convert -size 256x192 gradient:'#6fa8dc'-'#f6b26b' -fill '#ffd966' -draw "circle 190,55 190,80" \
  -fill '#38761d' -draw "rectangle 0,140 256,192" -fill '#783f04' -draw "polygon 30,140 75,70 120,140" \
  -fill '#cc0000' -draw "rectangle 150,110 200,150" "$scene"

start_app() {
  ./target/release/atelier --model tests/fixtures/sd1/model --device cpu --seed 7 \
    --library "$home/library" \
    --prompt "a red barn beside a mountain at sunset, oil painting" --init-image "$scene" "$@" &
  app=$!
  for _ in $(seq 100); do
    xdotool search --onlyvisible --name Atelier >/dev/null 2>&1 && break
    sleep 0.2
  done
  window=$(xdotool search --onlyvisible --name Atelier | head -1)
  xdotool windowsize "$window" 1500 950
  xdotool windowmove "$window" 0 0
  sleep 3                                  # the fixture model loads
}
generate() { xdotool mousemove 80 894 click 1; }   # the Generate button, below the controls

# Image to image at strength 0.35.
start_app --strength 0.35 --size 128x96 --steps 20
generate
sleep 15
import -window root screenshots/img2img.png

# Paint a mask over the barn with the mouse (the painter shows the picture fitted to the centre).
xdotool mousemove 53 493 click 1           # Paint mask…
sleep 1
xdotool mousemove 930 560 mousedown 1
for point in "980 560" "1040 560" "1090 560" "1090 610" "1040 610" "980 610" "930 610" \
  "930 660" "980 660" "1040 660" "1090 660" "1090 690" "930 690"; do
  xdotool mousemove $point
  sleep 0.05
done
xdotool mouseup 1
xdotool mousemove 1000 300                 # the brush outline, off the mask
sleep 0.5
import -window root screenshots/mask-painted.png

# Inpaint it: Done, then Generate (the rest of the picture is kept).
xdotool mousemove 1181 43 click 1
sleep 0.5
generate
sleep 15
import -window root screenshots/inpainted.png
kill $app; app=""
sleep 1

# Outpainting: 64 pixels more on the left and the right, at the canvas' size.
start_app --outpaint 64,0,64,0 --size 128x64 --steps 10
generate
sleep 30                                   # 10 steps at 128x64 (the fixture's VAE halves, not eighths)
import -window root screenshots/outpainted.png
kill $app; app=""
echo "saved screenshots/img2img.png mask-painted.png inpainted.png outpainted.png"
