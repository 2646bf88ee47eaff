#!/usr/bin/env bash
# The measurements still owed to #22, #23 and #26, as one device call each (`run`, from the repository root, with
# .whl/core, .whl/recast and .whl/src carried: benchmarks/device/carry.sh, and the SageAttention source archive as
# sage.sh says). Fire them in this order, each as soon as the last returns: a machine idle for 30 s is given back,
# and the next call then pays a fresh start (~3 min) and SageAttention's build again.
#
#   bash benchmarks/device/next.sh chain       ~550 s  SageAttention built beside the `lightning` edit weights prepared
#                                                      on /dev/shm, then the clip and the photo-to-clip chain, both
#                                                      with the VAE's fused norms (#23, #26)
#   bash benchmarks/device/next.sh clip        ~550 s  the same first steps, then the clip with the VAE's fused norms
#                                                      (the profiles' default) and without (`@diffusers-vae`, #26)
#   bash benchmarks/device/next.sh stream      ~400 s  after chain, on the same machine: the `wan22-lightning` weights
#                                                      prepared beside the edit's, then one `recast serve` for both
#                                                      stages: 8 photo-to-clip runs at once, then 32 `lightning` edits,
#                                                      a cap of 8 flow runs at once (#23's streams, the chain's card)
#   bash benchmarks/device/next.sh kernels     ~600 s  carry [".whl/core/site.tar.xz", ".whl/recast", ".whl/src"] (the
#                                                      sources need the room ffmpeg and PostgreSQL take): SageAttention
#                                                      and FlashAttention-3 (FP8 forward, head dim 128) built at once,
#                                                      then every attention kernel at the Qwen and Wan shapes side by
#                                                      side (#26); call it again on the same machine if a build is cut
#   bash benchmarks/device/next.sh burst       ~300 s  32 `lightning` edits through `recast serve`, with a cap of 8 flow
#                                                      runs at once, then of 4 (#23)
#   bash benchmarks/device/next.sh cold-edit   ~330 s  the `fp8` edit worker's start: a new node compiling, a new node
#                                                      with the kept code (`prepare --compile`), restart, respawn (#22)
#   bash benchmarks/device/next.sh cold-video  ~380 s  the `wan22-offload` weights prepared on /dev/shm, then its starts
#                                                      (#22: host RSS <= 48 GiB; its streamed shards now pinned in place)
#   bash benchmarks/device/next.sh reads       ~370 s  the `fp8` worker's restart and respawn reading its prepared weights
#                                                      in blocks through 1 GiB (the default) and whole through the 4-GiB
#                                                      pinned pool (`@shards`), and a new node with the kept code
#   bash benchmarks/device/next.sh both        ~400 s  the worker for both stages (`lightning` + `wan22-lightning`) on a new
#                                                      node compiling, then with the kept code (#22's 45 s: a new node
#                                                      from an image made with `recast prepare --compile`)
#   bash benchmarks/device/next.sh fp8-clip    ~550 s  `wan22-fp8` with SageAttention against plain diffusers, 40 steps,
#                                                      two processes (#26's 0.58x), after chain or clip (their build);
#                                                      `fp8-clip wan22-fp8@sage,wan22-fp8@fa3-fp8` after kernels adds
#                                                      FlashAttention-3's FP8 forward (a process a row; call it again
#                                                      on the same machine for the rows a call had no time for)
#   bash benchmarks/device/next.sh fa3-edit    ~500 s  .whl/extra carried: the baseline, `lightning` and `fp8` with
#                                                      their default (FA3 in bf16) and with `@sage`, side by side in
#                                                      alternating order (#26); each row also times the text encoder
#                                                      (`text_encoder_ms`) and is traced once (--trace)
#   bash benchmarks/device/next.sh edit-ab     ~300 s  .whl/extra carried: `lightning` as shipped (FA3 in bf16) against
#                                                      `lightning@sage`, beside the baseline, 5 runs a row (#26)
#   bash benchmarks/device/next.sh fa3-clip 8  ~260 s  .whl/extra carried: `wan22-fp8` with SageAttention and with
#                                                      FA3's FP8 forward, beside the baseline, 8 steps (#26)
#
# Measured on 2026-12-05 (docs/PERFORMANCE.md, "an eighteenth session"): clip, the burst without a cap and with 8,
# the VAE's variants, cold-edit with the imports on a tmpfs; then ("a nineteenth session", one H100) cold-video's
# wan22-lightning rows, cold-edit with the early read, burst (8, 4); then ("a twentieth session", one H100)
# cold-video's wan22-offload rows (before its shards were pinned in place), fp8-clip, reads (blocks made the default);
# then ("a twenty-first session", one H100, in this order on one machine): chain, stream, cold-video, both.
# Then ("a twenty-third session", 2026-12-06, one H100): cold-edit (with `prepared+compile@no-readahead` beside the
# readahead) and both: #22's targets met in one run. Not run: cold-video (no time left; its rows are the
# twenty-first session's).
# Then ("a twenty-fourth session", 2026-12-06, one H100): kernels (both wheels back, now carried in .whl/extra),
# fa3-edit, fa3-clip 8 and the wan22-lightning pair both ways: FA3's FP8 forward made the Wan profiles' first choice.
# Then ("a twenty-fifth session", 2026-12-06, one H100): `fp8-clip wan22-fp8` (two calls: the 40-step baseline took
# the first: 0.580x) and fa3-edit with `lightning@_flash_3` and every row traced; the edit profiles then made to prefer
# FA3 in bf16, and on a second machine edit-ab and the same for `fp8@sage,fp8` (1.141 s against 1.189 s; 0.567x
# against 0.596x). #26's rows are all recorded; fa3-edit as it now stands repeats the last two with traces.
#
# Before the first call, here (a new checkout has no .whl/): `benchmarks/device/carry.sh` (a few minutes), and the
# SageAttention source as sage.sh says (`fetch` github:thu-ml/SageAttention, then its `git archive` of d1a57a5 into
# .whl/src). All of .whl/ and the repository no longer fit a call's 64 MiB: carry .whl/core/site.tar.xz,
# .whl/core/ffmpeg.xz and .whl/recast, with .whl/src for chain, clip and fp8-clip (SageAttention's source) and
# .whl/core/postgresql.tar.xz for stream and burst (kernels and fa3-edit as their lines say); rebuild .whl/recast
# (`carry.sh recast`) after a commit.
#
# Every result lands in $OUT (rows as JSON lines, logs); merge the rows into docs/performance.json here with
# benchmarks/common.py's write_rows.
set -o pipefail
cd "$(dirname "$0")/../.."
out=${OUT:?run this through the device tool, which sets OUT}
work=/dev/shm/cs  # the prepared weights, Prefect's home and the logs: in memory, kept between calls on one machine
source benchmarks/device/env.sh || exit 1
# A start an earlier call's time limit cut may still hold the card and its pinned memory (it did once): stop it.
pkill -9 -f '[b]enchmarks/(cold_start|gpu_video|gpu_edit|gpu_stream)[.]py' && sleep 2
need_attention_kernels() {  # the rows that compare attention kernels: both packages, or the call stops here
  python3 -c "import flash_attn_interface, sageattention" 2> /dev/null ||
    { echo "FlashAttention-3 or SageAttention is missing: carry .whl/extra, or run kernels first on this machine"; exit 1; }
}
uname -r; df -h /dev/shm | tail -1  # the prepared weights: edit 27.7 GiB a profile, Wan 36.5 GiB; one profile's at a time

case "${1:-}" in
  chain|clip)
    rows=wan22-lightning,chain-lightning
    [ "$1" = clip ] && rows=wan22-lightning,wan22-lightning@diffusers-vae
    (source benchmarks/device/sage.sh > "$out/sage.log" 2>&1) &
    sage=$!
    started=$(date +%s)
    RECAST_CACHE_DIR="$work/cache" python3 benchmarks/cold_start.py make-prepared --kind edit --profile lightning \
      --work "$work" > "$out/prepare.log" 2>&1
    rc=$?; echo "lightning prepared in $(( $(date +%s) - started )) s (rc $rc)"
    wait "$sage"; tail -2 "$out/sage.log"
    # stopped before the call's 600 s (each row is written to --out as it ends, so what finished comes back)
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_video.py --rows "$rows" --runs 2 --check \
      --out "$out/performance.json" > "$out/video.log" 2>&1
    echo "gpu_video rc $?"; tail -5 "$out/video.log"
    ;;
  stream)
    # SageAttention (built by chain) and the `lightning` folder it prepared are reused: both stages as the chain ran
    python3 -c "import sageattention" 2> /dev/null || echo "SageAttention is not built here: the streams run on SDPA"
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_stream.py --work "$work" \
      --clips 8 --edits 32 --databases postgres --take-next on_gpu --flow-run-starts fork --flow-runs-at-once 8 \
      --results "$out/stream.jsonl" > "$out/stream.log" 2>&1
    echo "gpu_stream rc $?"; tail -3 "$out/stream.log"
    tar -C "$work" -czf "$out/stream-logs.tgz" logs stream.log 2>/dev/null
    ;;
  kernels)
    (source benchmarks/device/sage.sh > "$out/sage.log" 2>&1) &
    sage=$!
    (FA3_JOBS=4 source benchmarks/device/fa3.sh > "$out/fa3.log" 2>&1) &
    fa3=$!
    # the builds share the 16 cores; each is cut at the call's limit less the benchmark's ~120 s
    ( sleep $(( 450 - SECONDS )); pkill -f '[n]vcc|[c]icc|[p]txas|[n]inja' ) & watchdog=$!
    wait "$sage" "$fa3"; kill "$watchdog" 2> /dev/null
    cat "$out/sage.log" "$out/fa3.log"; tail -30 .whl/fa3-build.log > "$out/fa3-build-tail.log" 2>/dev/null
    # The wheels come back (a file over 16 MiB in parts: `cat NAME.part-* > .whl/extra/NAME` here) and are carried
    # from then on (.whl/extra): a later machine installs them instead of building again.
    for wheel in .whl/extra/*.whl; do
      split -b 15M -d "$wheel" "$out/$(basename "$wheel").part-"; ls -la "$wheel"
    done
    timeout --signal=INT --kill-after=15 $(( 585 - SECONDS )) python3 benchmarks/attention.py --check \
      --results "$out/attention.jsonl" > "$out/attention.log" 2>&1
    echo "attention rc $?"; tail -32 "$out/attention.log"
    ;;
  burst)
    timeout 560 python3 benchmarks/gpu_stream.py --work "$work" --edits-only --edits 32 --databases postgres \
      --take-next on_gpu --flow-run-starts fork --flow-runs-at-once 8,4 --results "$out/stream.jsonl" \
      > "$out/stream.log" 2>&1
    echo "gpu_stream rc $?"; tail -3 "$out/stream.log"
    tar -C "$work" -czf "$out/stream-logs.tgz" logs 2>/dev/null
    ;;
  cold-edit)
    rm -rf "$work"/cache/prepared/edit-lightning-*  # the burst's, done with: room for fp8's
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/cold_start.py --rows fp8 \
      --scenarios prepared,prepared+compile@no-readahead,prepared+compile,restart,respawn --work "$work" --drop-after \
      --results "$out/cold-edit.jsonl" > "$out/cold-edit.log" 2>&1
    echo "cold_start rc $?"; tail -5 "$out/cold-edit.log"
    ;;
  cold-video)
    rm -rf "$work"/cache/prepared/*  # host memory: the tmpfs, the offload's 36 GiB of pinned blocks and the process
    # share the machine's 128 GiB (the nineteenth session's offload start ran beside two Wan folders, 73 GiB of tmpfs,
    # and did not finish within the call)
    # (no SageAttention: the offload profile streams its blocks with diffusers' SDPA; building it beside the weights
    # made the twentieth session's call end before its clean-up)
    started=$(date +%s)
    RECAST_CACHE_DIR="$work/cache" python3 benchmarks/cold_start.py make-prepared --kind video \
      --profile wan22-offload --work "$work" > "$out/prepare.log" 2>&1
    rc=$?; echo "wan22-offload prepared in $(( $(date +%s) - started )) s (rc $rc)"
    # each row is written to --results as it ends. Its host RSS: #22's <= 48 GiB
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/cold_start.py --rows wan22-offload \
      --scenarios prepared,restart --work "$work" --drop-after --results "$out/cold-video.jsonl" \
      > "$out/cold-video.log" 2>&1
    echo "cold_start rc $?"; tail -5 "$out/cold-video.log"; cp "$work/cold_start.log" "$out/" 2>/dev/null
    ;;
  reads)
    rm -rf "$work"/cache/prepared/video-*  # room for fp8's
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/cold_start.py --rows fp8 \
      --scenarios prepared,prepared+compile,restart,restart@shards,respawn,respawn@shards --work "$work" \
      --results "$out/reads.jsonl" > "$out/reads.log" 2>&1
    echo "cold_start rc $?"; tail -5 "$out/reads.log"
    ;;
  both)
    rm -rf "$work"/cache/prepared/*  # only the two folders this row makes: 64 GiB of the tmpfs
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/cold_start.py --rows both \
      --scenarios prepared,prepared+compile --work "$work" --results "$out/both.jsonl" > "$out/both.log" 2>&1
    echo "cold_start rc $?"; tail -5 "$out/both.log"
    ;;
  fp8-clip)
    python3 -c "import sageattention" 2> /dev/null ||
      { echo "SageAttention is missing: carry .whl/extra (kernels' wheels), or run chain (or clip) first here"; exit 1; }
    rm -rf "$work"/cache/prepared/*  # the cold starts' weights: host memory for the two pipelines' random weights
    # Two processes (an 80-GB card cannot hold the bf16 baseline beside the FP8 row), the second comparing with the
    # first's clip and pass inputs (--references) and its baseline row (--out, kept on the machine): when the
    # second is cut short, calling fp8-clip again on the same machine runs only the second.
    mkdir -p "$work/ref"; rows="$work/fp8-clip.json"
    if ! grep -q '"wan-diffusers-baseline"' "$rows" 2>/dev/null; then
      timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_video.py --rows wan-diffusers-baseline --check \
        --out "$rows" --references "$work/ref" > "$out/video-baseline.log" 2>&1
      echo "baseline rc $?"; tail -3 "$out/video-baseline.log"
    fi
    # The rows against it (default `wan22-fp8@sage`; e.g. `fp8-clip wan22-fp8@sage,wan22-fp8@fa3-fp8` after kernels
    # built FlashAttention-3 on this machine), one process each; a row already recorded here is not run again.
    for row in $(echo "${2:-wan22-fp8@sage}" | tr , ' '); do
      grep -q "\"$row\"" "$rows" 2>/dev/null && { echo "$row: recorded by an earlier call"; continue; }
      [ $(( 575 - SECONDS )) -lt 240 ] && { echo "$row: no time left in this call; call fp8-clip again"; break; }
      timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_video.py --rows "$row" --check \
        --out "$rows" --references "$work/ref" > "$out/video-$row.log" 2>&1
      echo "gpu_video $row rc $?"; tail -5 "$out/video-$row.log"
    done
    cp "$rows" "$out/performance.json"
    ;;
  fa3-clip)
    # #26: `wan22-fp8` with SageAttention (its default) against FlashAttention-3's FP8 forward, a short clip
    # (`fa3-clip STEPS`, default 8) beside the same run's plain diffusers: one process a row (an 80-GB card cannot
    # hold the bf16 baseline beside an FP8 row), each later row scored against the baseline's clip and pass. On a new
    # machine carry .whl/extra (the wheels `kernels` brought back) instead of building; a row recorded is not run again.
    need_attention_kernels
    steps=${2:-8}; mkdir -p "$work/ref-$steps"; rows="$work/fa3-clip-$steps.json"
    for row in wan-diffusers-baseline wan22-fp8@sage wan22-fp8@fa3-fp8; do
      grep -q "\"$row\"" "$rows" 2>/dev/null && { echo "$row: recorded by an earlier call"; continue; }
      [ $(( 575 - SECONDS )) -lt 150 ] && { echo "$row: no time left in this call; call fa3-clip again"; break; }
      timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_video.py --rows "$row" \
        --steps "$steps" --check --out "$rows" --references "$work/ref-$steps" > "$out/video-$row.log" 2>&1
      echo "gpu_video $row rc $?"; tail -4 "$out/video-$row.log"
    done
    cp "$rows" "$out/performance.json"
    ;;
  fa3-edit)
    # With .whl/extra carried (or after kernels on the same machine): the edit's profiles with their default (FA3 in
    # bf16, `_flash_3,sage`) and with SageAttention, beside the baseline, one run, the two orders alternating (#26:
    # fp8 <= 0.50x, lightning <= 0.95 s). Each row traced once more: its kernel table in $out/trace, its top kernels
    # in the row. (A twenty-fifth session ran `lightning@fa3-fp8` and `fp8@fa3-fp8` here too: its FP8 forward loses
    # its kernel's lead to the cast's reductions at the edit's length.)
    need_attention_kernels
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_edit.py --runs 5 --check \
      --profiles diffusers-baseline,lightning@sage,lightning,fp8,fp8@sage \
      --trace "$out/trace" --out "$out/performance.json" > "$out/edit.log" 2>&1
    echo "gpu_edit rc $?"; tail -12 "$out/edit.log"
    ;;
  edit-ab)
    # #26, the shortest call for the edit's attention choice: `lightning` as shipped (FA3 in bf16 first) against
    # `lightning@sage`, beside the baseline (gpu_edit always runs it), 5 runs a row, no traces; each row is in
    # $out/performance.json as it ends (a call cut short keeps those done)
    need_attention_kernels
    timeout --signal=INT --kill-after=15 $(( 575 - SECONDS )) python3 benchmarks/gpu_edit.py --runs 5 \
      --profiles diffusers-baseline,lightning@sage,lightning --out "$out/performance.json" > "$out/edit.log" 2>&1
    echo "gpu_edit rc $?"; tail -6 "$out/edit.log"
    ;;
  *)
    echo "usage: bash benchmarks/device/next.sh chain|clip|stream|kernels|burst|cold-edit|cold-video|reads|both|fp8-clip|fa3-edit|fa3-clip|edit-ab" >&2
    exit 2
    ;;
esac
