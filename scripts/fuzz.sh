#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a bounded time and prints, per target,
# the inputs tried and the crashes found. Not part of CI: minutes, not seconds.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET ...]
#
# libFuzzer needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP=1.
# FUZZ_SANITIZER=address adds AddressSanitizer (slower; the parsers are safe Rust, so the default
# is none: panics, aborts, timeouts and memory over the limit are what is caught).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
mkdir -p fuzz/logs
printf '%-20s %12s %8s %s\n' target inputs crashes "seconds"
status=0
for target in "${targets[@]}"; do
  log=fuzz/logs/$target.log
  # -rss_limit_mb: a parser that allocates without bound is a crash too.
  if (cd fuzz && cargo fuzz run --sanitizer "$sanitizer" "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 \
        -max_len=65536 -print_final_stats=1) >"$log" 2>&1; then
    crashes=0
  else
    crashes=$(ls "fuzz/artifacts/$target" 2>/dev/null | wc -l)
    [ "$crashes" -gt 0 ] || crashes="error (see $log)"
    status=1
  fi
  inputs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  printf '%-20s %12s %8s %s\n' "$target" "${inputs:-?}" "$crashes" "$seconds"
done
exit $status
