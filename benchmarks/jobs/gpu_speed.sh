#!/usr/bin/env bash
# The FP8 / fast-decode measurements on one GPU (H200): FP8 linears, fast decode, split-decode estimate, FP8 on a
# 24 GB card; Wan2.1-14B 1280x720x81, random weights. Parts (default: all three, ~9-10 min on an
# H200; run them as two calls when one command may take at most 10 min):
#   levers  lever rows + LoRA -> + FP8 linears -> + fast decode (4 CFG-free steps, STA 11-3-3, compiled
#           blocks), FP8 quality vs bf16 (per-step rel. L2, final latents, PSNR/SSIM), the goals, the
#           50-step CFG estimate incl. the published operating point                         (~5-6 min)
#   decode  VAE decode variants: fp32/bf16, tiled/untiled, channels_last_3d, cudnn.benchmark, compiled
#           decoder; time, peak, PSNR/SSIM vs fp32; per-tile times (split over 2/4 ranks, est.);
#           the untiled need per dtype at 720p and 480p                                         (~2-3 min)
#   memory  14B 720p with FP8 DiT weights on a 24 GB card: offload model, then group            (~2-3 min)
#
#   benchmarks/jobs/gpu_speed.sh OUT_DIR [levers] [decode] [memory]      # on the GPU machine
#   benchmarks/jobs/gpu_speed.sh OUT_DIR --quick [parts...]              # tiny sizes on the CPU: the dry run
# Installs the carried wheels (.whl/: diffusers, peft, accelerate, torchao, ...; benchmarks/jobs/gpu_wheels.sh)
# through benchmarks/jobs/gpu_env.sh. Writes OUT_DIR/{levers,decode,memory}/ (each part's JSON + md), then
# OUT_DIR/speed.json (every part's JSON, commit, device, torch, command) and OUT_DIR/speed.md (the
# tables), printed last. Exit status 1 if a part failed (its error is in its JSON and log).
set -uo pipefail
command="benchmarks/jobs/gpu_speed.sh $*"
out=${1:?usage: benchmarks/jobs/gpu_speed.sh OUT_DIR [--quick] [levers] [decode] [memory]}
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
quick=0; parts=()
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    levers|decode|memory) parts+=("$a") ;;
    *) echo "gpu_speed.sh: unknown argument '$a'; use --quick, levers, decode, memory" >&2; exit 2 ;;
  esac
done
[[ ${#parts[@]} == 0 ]] && parts=(levers decode memory)
if [[ $quick == 0 ]]; then
  # shellcheck source=/dev/null
  source benchmarks/jobs/gpu_env.sh || exit 2
  python3 -c "import diffusers, peft, torchao" || { echo "diffusers/peft/torchao missing: stage them with benchmarks/jobs/gpu_wheels.sh and carry .whl" >&2; exit 2; }
  dev=(--device cuda)
  { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used \
      --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } > "$out.gpu.txt" 2>/dev/null || true
else
  dev=(--device cpu --quick)
fi
mkdir -p "$out"
[[ -f "$out.gpu.txt" ]] && mv "$out.gpu.txt" "$out/gpu.txt"
rc=0
for part in "${parts[@]}"; do
  mkdir -p "$out/$part"
  case $part in
    levers) python3 -m benchmarks.harness.levers --out "$out/levers" "${dev[@]}" --rows lora fp8 fastdecode ;;
    decode) python3 -m benchmarks.harness.decode --out "$out/decode" "${dev[@]}" ;;
    memory) if [[ $quick == 1 ]]; then
              python3 benchmarks/jobs/gpu_memory.py --part fp8-quick --device cpu --out "$out/memory"
            else
              python3 benchmarks/jobs/gpu_memory.py --part fp8-24g --device cuda --out "$out/memory" --budget-s 240
            fi ;;
  esac > >(tee "$out/$part/log.txt") 2>&1 || { echo "gpu_speed.sh: part $part failed (see $out/$part/log.txt)" >&2; rc=1; }
done
python3 - "$out" "$command" <<'PY' || rc=1
import json, sys
from pathlib import Path

out, command = Path(sys.argv[1]), sys.argv[2]
files = {"levers": "levers/levers.json", "decode": "decode/decode.json", "memory": "memory/memory_fp8-24g.json"}
files_quick = {**files, "memory": "memory/memory_fp8-quick.json"}
merged, md = {"command": command}, []
for part, rel in files.items():
    path = out / rel
    if not path.exists():
        path = out / files_quick[part]
    if path.exists():
        merged[part] = json.loads(path.read_text())
        md_path = path.with_suffix(".md")
        if md_path.exists():
            md.append(md_path.read_text())
env = next((merged[p].get("env") or merged[p].get("environment") for p in ("levers", "decode", "memory") if p in merged), {})
merged["env"] = {k: env.get(k) for k in ("commit", "device_name", "torch", "cuda", "diffusers", "created")} if env else {}
(out / "speed.json").write_text(json.dumps(merged, indent=1, default=str))
head = (f"# FP8 and fast-decode measurements\n\nCommand: `{command}`; commit {merged['env'].get('commit')}, device "
        f"{merged['env'].get('device_name')}, torch {merged['env'].get('torch')}.\n\n")
(out / "speed.md").write_text(head + "\n".join(md))
print(head + "\n".join(md))
PY
exit $rc
