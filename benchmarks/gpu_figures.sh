#!/usr/bin/env bash
# The GPU figures of docs/results/speed.md, in one run of at most BUDGET seconds (570 unless set) on one GPU, at
# full size with random weights (bench_photo.py). Each run protects the sample photo for a few
# steps and records its whole time, its peak memory, the first step (compilation included) and
# the steady time per step: a preset's time per photo is the rest of `seconds` plus its steps
# times `step_seconds`. In order of need, each with its own time limit (cut to what is left of
# the budget), so that one that fails or runs long does not cost the others:
#   1. CogVideoX-5B-I2V with `balanced` as a user runs it: on its long video, 5 steps on a quarter of
#      the frames spread over the video, then 1 on every frame (about 48 s per photo by the estimate);
#   2. CogVideoX-5B-I2V in the 80 GB, 24 GB and 12 GB memory modes (`max`, `offload`,
#      `sequential`: peak memory per mode; seconds per step), on every frame, as `strong` and
#      `balanced`'s last step run. `full` computes as `offload` here: random prompt embeddings
#      stand in for the text encoder, which is all that `offload` keeps off the GPU;
#   3. DynamiCrafter 512, Open-Sora 1.2 and SVD-XT with the default;
#   4. the cheap settings on all three: two sampler steps, and on CogVideoX (the only one of the
#      three that can change its frame count) a quarter of the frames;
#   5. the same with the denoiser compiled, and CogVideoX's with the flash attention kernel;
#   6. last, DynamiCrafter's compiled: its U-Net compiles a graph per block shape and gradient
#      mode (25 for the tiny U-Net's 9 blocks), which may take longer than the budget has left.
#
#   benchmarks/gpu_figures.sh          # writes benchmarks/results/bench_photo_gpu_*.json
#   RESULTS=/some/folder benchmarks/gpu_figures.sh   # writes each file there as soon as its run ends
#   COGVIDEOX=tiny-cogvideox DYNAMICRAFTER=tiny-dynamicrafter OPENSORA=tiny-opensora \
#       DEVICE=cpu benchmarks/gpu_figures.sh    # the same runs on tiny models, to check the script
set -uo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 PYTHONPATH="../src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
COGVIDEOX=${COGVIDEOX:-full:cogvideox}
DYNAMICRAFTER=${DYNAMICRAFTER:-full:dynamicrafter-512}
OPENSORA=${OPENSORA:-full:opensora}
SVD=${SVD:-full:svd-xt}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-results}
BUDGET=${BUDGET:-570}
CHEAP="anti-i2v:sampler_steps=2"
CHEAP_COGVIDEOX="$CHEAP;frame_share=0.25"
failed=0
mkdir -p "$RESULTS"

bench() {  # NAME SECONDS STEPS ARGS...: one bench_photo.py run, written to $RESULTS/bench_photo_gpu_NAME.json
  local name=$1 limit=$2 steps=()  # STEPS "preset": the preset's own
  [ "$3" != preset ] && steps=(--steps "$3")
  shift 3
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "!! $name skipped: the budget of ${BUDGET} s is spent" >&2
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s)"
  if ! timeout "$limit" "$PYTHON" bench_photo.py --device "$DEVICE" "${steps[@]}" \
      --out "$RESULTS/bench_photo_gpu_$name.json" "$@"; then
    echo "!! $name failed or ran out of time" >&2
    failed=1
  fi
}

bench balanced_cogvideox 150 preset --models "$COGVIDEOX" --preset balanced
bench memory_modes 300 2 --models "$COGVIDEOX" --memory max,offload,sequential --method "anti-i2v:frame_share=1"
bench default 120 3 --models "$DYNAMICRAFTER,$OPENSORA,$SVD"
bench cheap_cogvideox 60 3 --models "$COGVIDEOX" --method "$CHEAP_COGVIDEOX"
bench cheap 60 3 --models "$DYNAMICRAFTER,$OPENSORA" --method "$CHEAP"
bench compiled_cogvideox 90 3 --models "$COGVIDEOX" --method "$CHEAP_COGVIDEOX" --compile
bench compiled_opensora 90 3 --models "$OPENSORA" --method "$CHEAP" --compile
if [ "$DEVICE" != cpu ]; then  # the flash kernel exists on CUDA only
  bench flash_cogvideox 60 3 --models "$COGVIDEOX" --method "$CHEAP_COGVIDEOX" --attention flash
fi
bench compiled_dynamicrafter 150 3 --models "$DYNAMICRAFTER" --method "$CHEAP" --compile
exit $failed
