export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
END=$(( $(date +%s) + ${BUDGET:-540} ))
left() { l=$(( END - $(date +%s) )); [ $l -lt 5 ] && l=5; echo $l; }
mkdir -p runs/gpu; W=runs/gpu; S="--device cuda --model smollm2"
tar czf $OUT/early.tgz --exclude='*.cache' $W; ls $W
FAM=${FAM:-$(python3 -c "
import json; r=json.load(open('$W/full_1024.json'))['records']
fams=[f for f in dict.fromkeys(x['family'] for x in r) if sum(x['full'] for x in r if x['family']==f)/sum(1 for x in r if x['family']==f) >= 0.5]
print(','.join(fams))")}
echo "evaluation families (full cache >= 0.5 at 1k, dev seed 1): $FAM"; echo $FAM > $W/families.txt
SC=expected_attention,snapkv,keydiff,oracle
[ -f $W/intask.done ] || { timeout $(left) python3 real.py --intask $S --families $FAM --scorers $SC --calib-contexts ${NCAL:-8} --out $W/smollm2.npy > $W/intask.txt 2>&1 && touch $W/intask.done; }
tail -12 $W/intask.txt
TABLES=$(ls checkpoints/smollm2_{snapkv,keydiff,expected_attention,oracle}.npy $W/smollm2_intask_*.npy | tr '\n' ',' | sed 's/,$//')
for SET in ${SETTINGS:-agnostic}; do
  [ -f $W/eval_$SET.json ] || timeout $(left) python3 real.py --eval $S --families $FAM --scorers $SC --allocators uniform,pyramid,adakv,lukv,shuffled,oracle,intask --table $TABLES --ratios 0.5,0.8,0.9 --settings $SET --n 25 --seed 2 --json $W/eval_$SET.json > $W/eval_$SET.txt 2>&1
  tail -4 $W/eval_$SET.txt; wc -l $W/eval_$SET.json.partial.jsonl
done
tar czf $OUT/gpu_runs.tgz --exclude='*.cache' $W
ls -la $OUT
