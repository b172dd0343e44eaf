#!/usr/bin/env bash
# GPU check of `wan-nabla batch --engine ray` on one multi-GPU node: one actor per GPU (Ray's own
# GPU assignment), the tiny model on cuda, every item exactly once, per-actor throughput.
#   benchmarks/jobs/gpu_ray_batch.sh OUT_DIR [ITEMS]      (DEVICE=cpu SIZE=16x16: a CPU dry run)
# Writes OUT_DIR/ray_gpu.json and OUT_DIR/ray_gpu.md (commit, devices, torch/ray versions, command).
# Needs ray (pip install 'wan-nabla[ray]'); no network, no model download (tiny model).
set -euo pipefail
OUT="${1:?usage: gpu_ray_batch.sh OUT_DIR [ITEMS]}"
ITEMS="${2:-64}"
mkdir -p "$OUT"
python -c "import ray" || { echo "ray is not installed: pip install 'wan-nabla[ray]'" >&2; exit 3; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for i in $(seq 0 $((ITEMS - 1))); do echo "clip number $i"; done > "$work/p.txt"
cmd=(wan-nabla batch "$work/p.txt" --out-dir "$work/out" --model tiny --size "${SIZE:-256x256}" --frames 17 --steps 8
     --device "${DEVICE:-cuda}" --engine ray --quiet)
t0=$(date +%s.%N)
"${cmd[@]}" 2> "$work/stderr.txt" || { cat "$work/stderr.txt" >&2; exit 1; }
t1=$(date +%s.%N)
python - "$work/out" "$OUT" "$t0" "$t1" "${cmd[*]}" <<'EOF'
import collections, json, subprocess, sys
from pathlib import Path
import ray
from benchmarks.harness.records import environment
from wan_nabla.batch.manifest import read_manifest

out, dest, t0, t1, cmd = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
recs = read_manifest(out / "manifest.jsonl")
ok = [r for r in recs if r["status"] == "ok"]
per_actor = collections.defaultdict(list)
for r in ok:
    side = json.loads((out / r["sidecar"]).read_text())
    per_actor[(r["worker"]["actor"], side["device"], side["versions"]["gpu"])].append(r["timings"]["total_s"])
try:
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines()
except FileNotFoundError:  # a CPU dry run of this script
    gpus = []
env = environment([], "cuda" if gpus else "cpu")
res = {"env": env, "commit": env["commit"], "gpus": gpus, "torch": env["torch"], "ray": env["ray"], "command": cmd,
       "items": len(recs), "ok": len(ok), "each_once": sorted(r["index"] for r in recs) == list(range(len(recs))),
       "wall_s": round(t1 - t0, 1),
       "actors": [{"actor": a, "device": d, "gpu": g, "items": len(t), "s_per_item": round(sum(t) / len(t), 3)}
                  for (a, d, g), t in sorted(per_actor.items())]}
(dest / "ray_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
md = [f"# batch --engine ray on {len(gpus)} GPU(s), tiny model", "",
      f"commit {res['commit']}, torch {res['torch']}, ray {res['ray']}; `{cmd}`", "",
      f"{res['ok']}/{res['items']} ok, each item once: {res['each_once']}, wall {res['wall_s']} s (with cluster start)", "",
      "| actor | device | gpu | items | s/item |", "|---|---|---|---|---|"]
md += [f"| {a['actor']} | {a['device']} | {a['gpu']} | {a['items']} | {a['s_per_item']} |" for a in res["actors"]]
(dest / "ray_gpu.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
