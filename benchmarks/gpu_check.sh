#!/usr/bin/env bash
# One prepared GPU check of noder-monai, about 5 minutes on one GPU (at most 8):
#   1. the test suite's CUDA tests (the device-parametrized ones and those that need CUDA), with CUDA available;
#   2. benchmarks/scale.py --device cuda at 144x176x144 and 182x218x182 (6 scans, the default 300-epoch fit);
#   3. one bundle training run on cuda:0 (one 64^3 demo subject, the default fit);
# then prints one table. Run from anywhere: bash benchmarks/gpu_check.sh  (outputs under $OUT or a temporary folder).
# Needs: a CUDA torch, the package installed (pip install -e .), mricron-data for the full-resolution anatomy
# (otherwise scale.py upsamples the shipped volume and says so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
THREADS=${THREADS:-$(nproc)}
start=$(date +%s)
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" || exit 1
uptime

# 1. CUDA tests (-k cuda selects the [cuda] parametrizations and the tests named for CUDA)
t0=$(date +%s)
timeout 240 python -m pytest -q -p no:cacheprovider -k cuda --junitxml="$OUT/tests.xml" tests > "$OUT/tests.log" 2>&1
echo "tests: exit $? in $(( $(date +%s) - t0 )) s (log $OUT/tests.log)"

# 2. scale benchmark on the GPU
t0=$(date +%s)
timeout 240 python benchmarks/scale.py --device cuda --threads "$THREADS" --epochs 300 \
    --sizes 144x176x144 182x218x182 --cache "$OUT/scale-cache" --output "$OUT/scale.md" --json "$OUT/scale.json" \
    > "$OUT/scale.log" 2>&1
echo "scale: exit $? in $(( $(date +%s) - t0 )) s (log $OUT/scale.log)"

# 3. one bundle training run on cuda:0, the design card's command
t0=$(date +%s)
python -c "from noder_monai.data import make_demo_dataset; make_demo_dataset('$OUT/bundle-data', n_subjects=1, size=64)"
timeout 150 python -m monai.bundle run training --config_file bundle/configs/train.json \
    --datalist "$OUT/bundle-data/datalist.json" --output_dir "$OUT/bundle-out" --subject_id sub-001 --device cuda:0 \
    > "$OUT/bundle.log" 2>&1
echo "bundle: exit $? in $(( $(date +%s) - t0 )) s (log $OUT/bundle.log)"

OUT="$OUT" ELAPSED=$(( $(date +%s) - start )) python - <<'EOF'
import json, math, os, xml.etree.ElementTree as ET

out = os.environ["OUT"]
rows = []
try:
    suite = ET.parse(os.path.join(out, "tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    rows.append(("CUDA tests", f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                 f"{counts['skipped']} skipped", f"{float(suite.get('time', 'nan')):.0f} s"))
except (OSError, ET.ParseError, IndexError) as error:
    rows.append(("CUDA tests", f"no result ({error})", "-"))
try:
    for r in json.load(open(os.path.join(out, "scale.json"))):
        rows.append((f"fit {r['size']}, {r['epochs']} epochs",
                     f"{r['fit_s']:.1f} s, CUDA peak {r['cuda_peak_gb']:.2f} GB, RSS peak {r['peak_rss_gb']:.2f} GB, "
                     f"NRMSE {r['nrmse_interpolation']:.4f} / {r['nrmse_extrapolation']:.4f} (linear "
                     f"{r['linear_nrmse_interpolation']:.4f} / {r['linear_nrmse_extrapolation']:.4f})",
                     f"predict {r['predict_s']:.2f} s per time"))
except (OSError, ValueError, KeyError) as error:
    rows.append(("scale benchmark", f"no result ({error})", "-"))
try:
    from noder_monai.model import FittedSubject

    subject = FittedSubject.load(os.path.join(out, "bundle-out", "sub-001", "model.pt"))
    history = subject.history
    rows.append(("bundle training on cuda:0", f"{len(history)} epochs, final loss {history[-1]['total']:.4f}",
                 "model.pt written"))
except Exception as error:  # the table reports whatever failed
    rows.append(("bundle training on cuda:0", f"no model ({type(error).__name__}: {error})", "-"))
print(f"\n| check | result | note |\n|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
print(f"\nall checks: {os.environ['ELAPSED']} s; outputs in {out}")
EOF
