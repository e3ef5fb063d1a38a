#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU run of the pipeline, in about nine minutes on one GPU.
#
# Prints torch / CUDA / driver facts, then checks, each part in its own process under `timeout`
# (a failing or hanging part never stops the others):
#   facts               versions, GPUs, nvidia-smi, nvcc vs torch's CUDA, what device: auto picks
#   kernels             the Triton neuron kernels compiled: spikes/membranes bit-identical to the torch path,
#                       gradients within tolerance; one full-size layer's forward + backward, torch vs Triton
#   amp_step            real training steps through fit(): bf16 autocast (auto) and fp16 + GradScaler
#   resume_cuda         kill -9 a CUDA fp16 training run after its first epoch; the rerun resumes it
#   resume_cpu_to_cuda  kill -9 a CPU run after its first epoch; the rerun finishes it on CUDA
#   stages              every stage of configs/default.yaml on CUDA (unroll parity must pass)
#   peer_sj             ours eager / ours fused / SpikingJelly on the plain ResNet-19, full width, T=4, batch
#                       128, fp32 and bf16, after checking that both fire identically (needs spikingjelly)
#   infer               the unrolled ResNet-19 (full width, T=4) on the GPU: FP32 / FP16, batch 1 / 32, eager
#                       and CUDA graphs, p50 latency and img/s
#   profile             the all-STAA bf16 training step with the fused kernels under torch.profiler: GPU time by
#                       op (what STAA kernels would have to win)
#   graphs              the training step (full width, T=4, batch 128, bf16, all-STAA and plain) eager vs CUDA
#                       graphs (make_graphed_callables on forward+backward; the whole step captured): ms/step
#   realdata            plain LIF vs all STAA through the train stage on the real CIFAR-10 subset (bench/data/ or
#                       GPU_CHECK_DATA; python bench/gpu_data.py puts it there), seeds 0 and 1, full width,
#                       GPU_CHECK_REALDATA_EPOCHS (8) epochs each: test top-1 on 2,000 images, mean difference
#   throughput          training img/s + peak memory, ResNet-19 full width, T=4, batch 128: fp32 / bf16 /
#                       fp16 eager (torch kernels), channels-last, fused Triton kernels (fp32, bf16), the
#                       plain network both ways (all-STAA / plain step); torch.compile with GPU_CHECK_COMPILE=1
#                       (it compiles in the background from the start)
# On a machine without a usable GPU the CUDA parts are skipped with the reason.
#
# Results: $GPU_CHECK_OUT (default bench/results/): gpu_check.json (every part's status and numbers),
# gpu_check.log (everything printed), parts/<part>.log. A summary table ends the output.
# Environment: PYTHON (default .venv/bin/python, else python3; it must import torch),
# GPU_CHECK_BUDGET_S (default 540: total seconds),
# GPU_CHECK_PARTS (default: all; facts always runs): e.g. GPU_CHECK_PARTS="kernels peer_sj infer profile throughput"
# for the fused-kernel figures alone (stages and resumes already passed on an H200), or a rerun of some,
# GPU_CHECK_REALDATA_EPOCHS (default 8), GPU_CHECK_REALDATA_SETS (more --set KEY=VALUE for its runs, space-separated),
# GPU_CHECK_DATA (the folder with cifar10_test.npz and cifar10_train_subset.npz; default bench/data, ../shared/data),
# GPU_CHECK_COMPILE=1 (add the torch.compile throughput variants: they did not finish compiling in 5 min),
# GPU_CHECK_FULL=1 (the default config's full schedule instead of a short one),
# GPU_CHECK_NNCF_BUILD=1 (let NNCF build its CUDA extension when nvcc matches; default: reference kernels).
# Wheels: when ./.whl exists and nncf or spikingjelly is not importable, they are installed into /tmp/site
# first (peer_sj: pip download --no-deps -d .whl spikingjelly==2.0.0 loguru==0.7.3 before the run).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
# the project's venv when there is one (a bare python3 may have no torch), else python3
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "gpu_check: $PY cannot import torch: run 'make install' (it makes .venv), or set PYTHON to a python" \
         "that has the requirements installed" >&2
    exit 2
fi
OUT=${GPU_CHECK_OUT:-$REPO/bench/results}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
PARTS=${GPU_CHECK_PARTS:-all}
mkdir -p "$OUT/parts" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
START=$(date +%s)
BG_PID=""

exec > >(tee "$LOG") 2>&1

cleanup() {  # the background throughput part: TERM lets it kill its own workers (they also time out)
    if [ -n "$BG_PID" ] && kill -0 "$BG_PID" 2>/dev/null; then
        kill -TERM "$BG_PID" 2>/dev/null
    fi
}
trap cleanup EXIT

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) repo $REPO, python $PY, budget ${BUDGET}s, work $WORK, out $OUT"

# nncf.strip imports torchao's pt2e observers (pure Python): its compiled kernels are not needed
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
if [ -d "$REPO/.whl" ] && ! "$PY" -c "import nncf, spikingjelly" >/dev/null 2>&1; then
    echo "== installing $(ls "$REPO"/.whl/*.whl 2>/dev/null | wc -l) wheels from .whl into /tmp/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$REPO"/.whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        # .whl/alt holds another torchao release: used when the first does not import with this torch
        if ! "$PY" -c "import torchao.quantization.pt2e.observer" >/dev/null 2>&1 && ls "$REPO"/.whl/alt/*.whl >/dev/null 2>&1; then
            echo "== torchao does not import with this torch; trying $(ls "$REPO"/.whl/alt/)"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$REPO"/.whl/alt/*.whl
        fi
    else
        echo "!! wheel install failed: parts that import nncf will fail"
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# record: append the part's RESULT line (or a synthesised one) to $RESULTS
record() {  # name rc seconds logfile
    local name=$1 rc=$2 secs=$3 logf=$4 line
    line=$(grep '^RESULT ' "$logf" 2>/dev/null | tail -n 1 | sed 's/^RESULT //')
    if [ -z "$line" ]; then
        local status=fail reason="exited with code $rc and no RESULT line (see parts/$name.log)"
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then reason="timed out after ${secs}s"; fi
        line=$("$PY" -c 'import json,sys; print(json.dumps({"part": sys.argv[1], "status": sys.argv[2], "reason": sys.argv[3], "seconds": float(sys.argv[4]), "data": {}}))' "$name" "$status" "$reason" "$secs")
    fi
    echo "$line" >> "$RESULTS"
}

selected() {  # name: whether GPU_CHECK_PARTS asks for it
    [ "$PARTS" = all ] || [ "$1" = facts ] || [[ " $PARTS " == *" $1 "* ]]
}

part() {  # name timeout_s
    local name=$1 limit=$2 left logf t0 rc
    left=$(remaining)
    logf="$OUT/parts/$name.log"
    if ! selected "$name"; then
        echo "{\"part\": \"$name\", \"status\": \"skip\", \"reason\": \"not in GPU_CHECK_PARTS ($PARTS)\", \"seconds\": 0, \"data\": {}}" >> "$RESULTS"
        return
    fi
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped (time budget spent)"
        echo "{\"part\": \"$name\", \"status\": \"skip\", \"reason\": \"time budget (${BUDGET}s) spent\", \"seconds\": 0, \"data\": {}}" >> "$RESULTS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s, $(elapsed)s elapsed)"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$PY" "$REPO/bench/gpu_check_parts.py" "$name" --work "$WORK" --limit "$limit" > "$logf" 2>&1
    rc=$?
    grep -v '^RESULT ' "$logf" | tail -n 40
    record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$logf"
    echo "-- $name: $(tail -n 1 "$RESULTS" | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); print(r["status"], r["reason"][:300])')"
}

part facts 60
part kernels 150  # Triton compiles each specialisation on first use (a second or so each)

# the compiled throughput variants (GPU_CHECK_COMPILE=1) compile in the background while the other parts run
if selected throughput; then
    TP_LIMIT=$(( $(remaining) - 5 ))
    TP_T0=$(date +%s)
    timeout -k 5 "$TP_LIMIT" "$PY" "$REPO/bench/gpu_check_parts.py" throughput --work "$WORK" --limit "$TP_LIMIT" \
        > "$OUT/parts/throughput.log" 2>&1 &
    BG_PID=$!
    echo "== throughput: started in the background (pid $BG_PID, limit ${TP_LIMIT}s)"
fi

part amp_step 60
part stages 150  # first: on the first H200 run it came last and ran out of budget (about 110 s alone)
part resume_cuda 75
part resume_cpu_to_cuda 90
part peer_sj 120
part infer 60
part profile 60
part graphs 120  # the training step eager vs CUDA graphs: capture, then about 90 timed steps per network

# realdata: 4 train-stage runs (up to 300 s), leaving throughput 150 s to time its variants
RD_LIMIT=$(( $(remaining) - $(selected throughput && echo 150 || echo 0) ))
[ "$RD_LIMIT" -gt 300 ] && RD_LIMIT=300
if selected realdata && [ "$RD_LIMIT" -lt 60 ]; then
    echo "== realdata: skipped ($(remaining)s left, throughput keeps 150 s: it needs 60 s at least)"
    echo "{\"part\": \"realdata\", \"status\": \"skip\", \"reason\": \"time budget: ${RD_LIMIT}s left for it (raise GPU_CHECK_BUDGET_S or select fewer parts)\", \"seconds\": 0, \"data\": {}}" >> "$RESULTS"
else
    part realdata "$RD_LIMIT"
fi

touch "$WORK/throughput.go"
if [ -n "$BG_PID" ]; then
    echo "== throughput: timing now ($(elapsed)s elapsed)"
    wait "$BG_PID"
    TP_RC=$?
    BG_PID=""
    grep -v '^RESULT ' "$OUT/parts/throughput.log" | tail -n 25
    record throughput "$TP_RC" "$(( $(date +%s) - TP_T0 ))" "$OUT/parts/throughput.log"
else
    echo "{\"part\": \"throughput\", \"status\": \"skip\", \"reason\": \"not in GPU_CHECK_PARTS ($PARTS)\", \"seconds\": 0, \"data\": {}}" >> "$RESULTS"
fi

"$PY" - "$RESULTS" "$OUT/gpu_check.json" "$(elapsed)" "$BUDGET" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
doc = {"total_s": int(sys.argv[3]), "budget_s": int(sys.argv[4]), "parts": rows}
json.dump(doc, open(sys.argv[2], "w"), indent=1, default=str)
print("\n== summary (%s s of %s s budget; details in %s)" % (sys.argv[3], sys.argv[4], sys.argv[2]))
print(f"{'part':<20} {'status':<6} {'s':>6}  note")
for r in rows:
    print(f"{r['part']:<20} {r['status']:<6} {r.get('seconds', 0):>6}  {r.get('reason', '')[:110]}")
tp = next((r for r in rows if r["part"] == "throughput"), None)
if tp and tp.get("data", {}).get("variants"):
    print(f"\n{'throughput variant':<24} {'img/s':>8} {'ms/step':>8} {'peak MiB':>9} {'1st step s':>10}  status")
    for label, v in tp["data"]["variants"].items():
        print(f"{label:<24} {str(v.get('images_per_s', '')):>8} {str(v.get('ms_per_step', '')):>8} "
              f"{str(v.get('peak_mem_mib', '')):>9} {str(v.get('first_step_s', '')):>10}  {v.get('status', 'ok')}")
    for k, v in tp["data"].get("ratios", {}).items():
        print(f"  {k}: {v}")
by = {r["part"]: r.get("data", {}) for r in rows}
for layer in by.get("kernels", {}).get("layers", []):
    print(f"kernels: {layer['kind']} T={layer['T']} {layer['dtype']} {'x'.join(map(str, layer['shape']))}: torch "
          f"{layer['torch_ms']} ms, triton {layer['triton_ms']} ms ({layer['speedup']}x), spikes "
          f"{'same' if layer['spikes_equal'] else 'DIFFER'}")
for p, row in by.get("peer_sj", {}).get("precisions", {}).items():
    print(f"peer_sj {p}: img/s {row.get('images_per_s')}, "
          + ", ".join(f"{k} {v}x" for k, v in row.items() if k.endswith("_over_spikingjelly"))
          + (f", errors {row['errors']}" if row.get("errors") else ""))
for k, v in by.get("infer", {}).get("rows", {}).items():
    print(f"infer {k}: p50 {v.get('p50_ms')} ms, {v.get('images_per_s')} img/s {v.get('error', '')}")
for r in by.get("profile", {}).get("top_ops", [])[:12]:
    print(f"profile: {r['op'][:60]:<60} {r['self_ms_per_step']:>8} ms/step {100 * r['share']:>5.1f}%")
for n, row in by.get("graphs", {}).get("networks", {}).items():
    print(f"graphs {n}: ms/step {row.get('ms_per_step')}, speed-up over eager {row.get('speedup_over_eager')}"
          + (f", errors {row['errors']}" if row.get("errors") else ""))
rd = by.get("realdata", {})
for k, r in rd.get("runs", {}).items():
    print(f"realdata {k}: " + (f"test top-1 {r['test_top1']}% ({r['epochs']} epochs, {r['wall_s']} s)"
                                if r.get("status") == "ok" else r.get("status", "")))
if rd.get("runs"):
    print(f"realdata: all STAA - plain LIF, test top-1 points by seed {rd.get('all_minus_plain_by_seed')}, "
          f"mean {rd.get('all_minus_plain_mean')}")
failed = [r["part"] for r in rows if r["status"] == "fail"]
print("\nFAILED: " + ", ".join(failed) if failed else "\nno part failed")
sys.exit(1 if failed else 0)
EOF
RC=$?
mkdir -p "$OUT/parts/work"
for f in "$WORK"/*/*.log "$WORK"/*/*/*.log; do  # the runs' own logs, before the scratch folder goes
    [ -f "$f" ] && cp "$f" "$OUT/parts/work/$(basename "$(dirname "$f")")_$(basename "$f")"
done
rm -rf "$WORK"
exit $RC
