# The query-aware SmolLM2 table and the full-cache runs at 1k/2k/4k with 25 examples per family, on one
# H200, as parallel processes (each is launch-bound, so several share the GPU): one per family for the
# table, the full-cache runs split by length and family. Every process writes its own .partial.jsonl;
# they are concatenated afterwards and the whole command (results/SMOLLM2.md) reads them back.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
B=${BUDGET:-520}; W=runs/gpu; mkdir -p $W
S="--device cuda --model smollm2 --threads 1"
FAM=niah_single,niah_multikey,niah_multivalue,niah_multiquery
SC=expected_attention,snapkv,keydiff,oracle
TABLES=$(ls checkpoints/smollm2_{snapkv,keydiff,expected_attention,oracle}.npy checkpoints/smollm2_intask/*.npy | tr '\n' ',' | sed 's/,$//')
for f in ${FAM//,/ }; do
  timeout $B python3 real.py --eval $S --families $f --scorers $SC --allocators uniform,pyramid,adakv,lukv,shuffled,oracle,intask --table $TABLES --ratios 0.5,0.8,0.9 --settings aware --n 25 --seed 2 --json $W/aware_$f.json > $W/aware_$f.txt 2>&1 &
done
timeout $B python3 real.py --full-cache $S --families $FAM,vt,cwe,fwe,qa --n 25 --seed 1 --length 1024 --json $W/full_1024.json > $W/full_1024.txt 2>&1 &
for L in 2048 4096; do
  timeout $B python3 real.py --full-cache $S --families $FAM --n 25 --seed 1 --length $L --json $W/full_${L}_a.json > $W/full_${L}_a.txt 2>&1 &
  timeout $B python3 real.py --full-cache $S --families vt,cwe,fwe,qa --n 25 --seed 1 --length $L --json $W/full_${L}_b.json > $W/full_${L}_b.txt 2>&1 &
done
wait
for x in $W/*.txt; do echo "== $x"; tail -3 $x; done
wc -l $W/*.partial.jsonl
tar czf $OUT/gpu_runs.tgz --exclude='*.cache' $W
ls -la $OUT
