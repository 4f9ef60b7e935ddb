#!/usr/bin/env bash
# Every core of the table, one after another (README.md here), then the table.
set -euo pipefail
here=results/smollm2/looped/cores
for spec in c12_15:12-15 c16_19:16-19 c12_19:12-19 c12_23:12-23; do
  [ -f "$here/${spec%:*}/copy.json" ] || "$here/run.sh" "${spec%:*}" "${spec#*:}"
done
python $here/summarise.py $here/c12_15 $here/c16_19 $here/c12_19 $here/c12_23 > $here/table.md
