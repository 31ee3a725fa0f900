#!/usr/bin/env bash
# Screenshots of the modes in the real window under Xvfb: image to image, a mask painted with the
# mouse, the inpainted result, and outpainting, with Atelier Shapes (the model inside Atelier,
# opened by its folder so that the window shows no first-start note).
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
for _ in $(seq 100); do [ -e /tmp/.X11-unix/X96 ] && break; sleep 0.1; done   # Xvfb is up
export DISPLAY=$display HOME=$home XDG_DATA_HOME=$home/data

# The picture to work on, in the model's own terms: a yellow circle, a green triangle and a red
# square on a blue background.
scene=$home/scene.png
convert -size 256x192 xc:'#234bd7' -fill '#f5dc23' -draw "circle 190,55 190,80" \
  -fill '#28a53c' -draw "polygon 30,150 75,70 120,150" \
  -fill '#dc1e23' -draw "rectangle 150,110 200,160" "$scene"

start_app() {
  ./target/release/atelier --model assets/atelier-shapes --device cpu --seed 7 \
    --library "$home/library" \
    --prompt "a large white star on a blue background" --init-image "$scene" "$@" &
  app=$!
  for _ in $(seq 100); do
    xdotool search --onlyvisible --name Atelier >/dev/null 2>&1 && break
    sleep 0.2
  done
  window=$(xdotool search --onlyvisible --name Atelier | head -1)
  xdotool windowsize "$window" 1500 950
  xdotool windowmove "$window" 0 0
  sleep 3                                  # the model loads
}
generate() { xdotool mousemove 80 894 click 1; }   # the Generate button, below the controls

# Image to image at strength 0.35.
start_app --strength 0.35 --size 128x96 --steps 20
generate
sleep 15
import -window root screenshots/img2img.png

# Paint a mask over the red square with the mouse (the painter shows the picture fitted to the centre).
xdotool mousemove 52 539 click 1           # Paint mask…
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
start_app --outpaint 64,0,64,0 --size 192x96 --steps 20
generate
sleep 15
import -window root screenshots/outpainted.png
kill $app; app=""
echo "saved screenshots/img2img.png mask-painted.png inpainted.png outpainted.png"
