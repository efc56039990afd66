#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the wheels that the GPU machine's image lacks for bench/gpu_check.sh,
# into .whl/ in the repo root (ignored by git through .git/info/exclude; carried with `carry: [".whl"]`).
# The image has torch 2.11, accelerate 1.15, safetensors, tokenizers, matplotlib, jinja2, sacrebleu and numpy;
# vlmtune also needs the versions below (transformers 5.24 for mm_encoder_outputs, which DPO/KTO/GRPO's shared
# image encoding uses; the image's 5.17 may predate it). About 60 MiB in all, with the repo just under the 64 MiB a
# call may carry: so not av (videos), rouge-score and nltk (ROUGE), which vlmtune imports only when it needs them
# and the check does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in transformers==5.24.0 peft==0.21.2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 bitsandbytes==0.50.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg" 2>&1 | grep -v "^WARNING: Location" || true
done
du -sh .whl && ls .whl
