#!/usr/bin/env bash
# Fuzzes flynode's entry points with libFuzzer (cargo-fuzz, nightly), one target after
# the other, for SECONDS each (default 300), then merges what added coverage into
# fuzz/corpus/<target>/ (kept minimal) and prints, per target, the executions,
# libFuzzer's final coverage (cov: edges, ft: features), the corpus size and any crash
# file (written to fuzz/artifacts/<target>/: commit it, CI replays it through the same
# oracle).
#
#   fuzz/run.sh [SECONDS] [TARGET...]       # all targets when none is named
#
# Environment: FUZZ_TOOLCHAIN (default nightly), FUZZ_SANITIZER (default none: the code
# under test is safe Rust apart from tun-rs's header copy, and without ASan libFuzzer
# runs ~3x more inputs; use `address` for a slower, stricter run), CARGO_BUILD_JOBS.
# Debug assertions and overflow checks are always on. Exits non-zero if a target found
# something.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-300}
shift || true
toolchain=${FUZZ_TOOLCHAIN:-nightly}
sanitizer=${FUZZ_SANITIZER:-none}
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

fuzz() {
    cargo "+$toolchain" fuzz "$@"
}
build_flags=(--sanitizer "$sanitizer" --debug-assertions)

echo "== building ${#targets[@]} target(s) ($toolchain, sanitizer $sanitizer)"
for t in "${targets[@]}"; do
    [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz/run.sh: no target $t" >&2; exit 2; }
    fuzz build "${build_flags[@]}" "$t"
done

logs=$PWD/fuzz/target/run-logs
mkdir -p "$logs"
summary=()
found=0
for t in "${targets[@]}"; do
    corpus=$PWD/fuzz/corpus/$t
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    fresh=$(mktemp -d)
    log=$logs/$t.log
    echo "== $t: ${seconds}s (log: $log)"
    # New inputs go to a scratch directory (the first one given); the committed corpus
    # is read only and gains only what the merge below keeps.
    status=0
    fuzz run "${build_flags[@]}" "$t" "$fresh" "$corpus" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | grep 'cov:' | tail -n 1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    # The corpus stays minimal: the seeds and the inputs kept on purpose (seed-*, keep-*),
    # plus the fewest of the old corpus and of this run's finds that reach every edge
    # they do not. Edges, not libFuzzer's features (-use_counters=0): hit counts would
    # keep about four times the inputs (the text targets past 2,000 each) for the same
    # code reached. If the merge fails, the corpus is left as it was.
    before=$(find "$corpus" -type f | wc -l)
    minimal=$(mktemp -d)
    find "$corpus" -type f \( -name 'seed-*' -o -name 'keep-*' \) -exec cp {} "$minimal"/ \;
    if fuzz run "${build_flags[@]}" "$t" "$minimal" "$corpus" "$fresh" -- -merge=1 -use_counters=0 \
        >>"$log" 2>&1; then
        rm -rf "$corpus"
        mv "$minimal" "$corpus"
        chmod 755 "$corpus"
    else
        echo "fuzz/run.sh: merging the corpus of $t failed (see $log); left as it was" >&2
        rm -rf "$minimal"
    fi
    after=$(find "$corpus" -type f | wc -l)
    rm -rf "$fresh"
    if [ "$status" -ne 0 ] || [ -n "$crash" ]; then
        found=1
        crash=${crash:-"exit status $status, see $log"}
    fi
    summary+=("$(printf '%-16s %12s %7s %7s %7s %+5d  %s' "$t" "${execs:-?}" "${cov:-?}" \
        "${ft:-?}" "$after" "$((after - before))" "${crash:--}")")
done

echo
printf '%-16s %12s %7s %7s %7s %5s  %s\n' target executions cov ft corpus new crash
printf '%s\n' "${summary[@]}"
exit "$found"
