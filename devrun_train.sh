export PYTHONPATH=$PWD FLEXNSA_COMMIT=$(cat .commit) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | head -4
T=/tmp/t; mkdir -p $T
(CUDA_VISIBLE_DEVICES=0,1 BENCH_SET="log.profile_steps=[3]" RUN_TIMEOUT=520 bash scripts/bench_train_7b.sh $T/a nsa:65536:16 > $T/a.out 2>&1) &
(CUDA_VISIBLE_DEVICES=2,3 BENCH_SET="log.profile_steps=[3]" RUN_TIMEOUT=520 bash scripts/bench_train_7b.sh $T/b dense:65536:16 > $T/b.out 2>&1) &
wait
tail -5 $T/a.out $T/b.out
python3 -m train.trace_summary $T/a/nsa-65536/profile/step3.rank0.pt.trace.json.gz $T/b/dense-65536/profile/step3.rank0.pt.trace.json.gz --out $T/kernel_time.md 2>&1 | tail -3
python3 -m train.bench_report $T/a $T/b --out $T/report.md
cat $T/report.md
mkdir -p $OUT/r; cd $T && tar czf $OUT/r/train.tgz --exclude='*.json.gz' a b a.out b.out kernel_time.md report.md
