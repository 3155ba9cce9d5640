#!/usr/bin/env bash
# Issue "paper's setting" device job: the transfer study's dev runs, the pre-registered choice of the default
# protocol, the final-seed tables at 1k and 4k, the in-task profiles and the full cache at 4k. SmolLM2-135M-Instruct
# on one GPU, as parallel processes (each is launch-bound). Run from the repository root with $OUT set.
set -u
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
END=$(( $(date +%s) + ${BUDGET:-560} ))
left() { l=$(( END - $(date +%s) )); [ $l -lt 5 ] && l=5; echo $l; }
W=runs/gpu; mkdir -p $W; S="--model smollm2 --device cuda --threads 1"
FAM="niah_single niah_multikey niah_multivalue niah_multiquery"
SC=expected_attention,keydiff
STUDY=$(ls .study/tables/*.npy | tr '\n' ',' | sed 's/,$//')
# ---- phase 1: dev seed 1 (n=10, 80%): every study table as an LU-KV row; in-task profiles; full cache at 4k
P1=$(( $(left) * ${P1SHARE:-45} / 100 ))
for L in 1024 4096; do for f in $FAM; do
  [ -f $W/dev_${L}_$f.json ] || timeout $P1 python3 -m experiments.evaluate --eval $S --protocol paper --scorers $SC \
    --allocators lukv --table $STUDY --ratios 0.8 --n 10 --seed 1 --length $L --families $f \
    --json $W/dev_${L}_$f.json > $W/dev_${L}_$f.txt 2>&1 &
done; done
for a in "paper 1024" "paper 4096" "documents 4096"; do set -- $a
  [ -f $W/intask_$1_$2.done ] || { timeout $P1 python3 -m experiments.evaluate --intask $S --protocol $1 --scorers $SC \
    --families ${FAM// /,} --calib-contexts 8 --length $2 --out $W/it_$1_$2.npy > $W/intask_$1_$2.txt 2>&1 \
    && touch $W/intask_$1_$2.done; } &
done
timeout $P1 python3 -m experiments.evaluate --full-cache $S --families niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,qa \
  --n 25 --seed 1 --length 4096 --json $W/full_4096_seed1.json > $W/full_4096_seed1.txt 2>&1 &
wait
for x in $W/dev_*.txt $W/intask_*.txt $W/full_*.txt; do echo "== $x"; tail -n 2 $x; done
# ---- the pre-registered choice (written before any dev result was seen): for every protocol P and policy
# (its 1k table everywhere, its 4k table everywhere, its table of the evaluated length), the mean over
# {1k, 4k} x {EA, KeyDiff} of LU-KV's dev score at 80%; the best wins; ties: documents, then the 1k policy
tar czf $OUT/phase1.tgz --exclude='*.cache' $W
python3 .study/choose.py $W > $W/choice.txt; cat $W/choice.txt
PROTO=$(sed -n 's/^protocol //p' $W/choice.txt); POLICY=$(sed -n 's/^policy //p' $W/choice.txt)
# ---- phase 2: final seed 3, n=25, 50/80/90%, every row
for L in 1024 4096; do
  TL=$L; [ "$POLICY" = 1024 ] && TL=1024; [ "$POLICY" = 4096 ] && TL=4096
  FIRST=$(ls .study/tables/smollm2_${PROTO}_${TL}_*.npy | tr '\n' ',')
  REST=$(ls .study/tables/*.npy | grep -v "smollm2_${PROTO}_${TL}_" | tr '\n' ',')
  IP=$PROTO; [ $PROTO = mixed ] && IP=paper  # in-task tables depend on the protected window only: mixed's is paper's
  if [ "$IP" = documents ] && [ $L = 1024 ]; then IT=$(ls checkpoints/intask/smollm2_niah_*_{expected_attention,keydiff}.npy | tr '\n' ',');
  else IT=$(ls $W/it_${IP}_${L}_intask_*.npy | tr '\n' ','); fi
  for f in $FAM; do
    timeout $(left) python3 -m experiments.evaluate --eval $S --protocol $PROTO --scorers $SC \
      --allocators uniform,pyramid,adakv,lukv,shuffled,oracle,intask --table ${FIRST}${REST}${IT%,} \
      --ratios 0.5,0.8,0.9 --n 25 --seed 3 --length $L --families $f --json $W/final_${L}_$f.json > $W/final_${L}_$f.txt 2>&1 &
  done
done
wait
for x in $W/final_*.txt; do echo "== $x"; tail -n 3 $x; done
wc -l $W/*.partial.jsonl
tar czf $OUT/gpu_runs.tgz --exclude='*.cache' $W
ls -la $OUT
