# Second device run: generation test (wandb stubbed: the device has none), mixed-decode latency, N=256 throughput, a profile.
export PYTHONUNBUFFERED=1 WANDB_MODE=offline KVGYM_HELLASWAG=$PWD/.gpu/hellaswag_val.jsonl KVGYM_CACHE=/tmp/kvgym TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
mkdir -p /tmp/site/wandb && touch /tmp/site/wandb/__init__.py
export PYTHONPATH=/tmp/site:$PWD
python3 .gpu/make_random.py /tmp/smol-rand 2>&1 | tail -1
S=$(date +%s)
timeout 60 python3 -m pytest -q -p no:cacheprovider --timeout 50 tests/envs/test_cuda.py -k "generation or batched" 2>&1 | tail -8 > $OUT/pytest2.log; cat $OUT/pytest2.log
echo "pytest took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 90 python3 -m experiments.bench_latency --model /tmp/smol-rand --context 1024 --new-tokens 32 --repeats 3 --widths 4 2 --out $OUT/latency.json --no-progress 2>&1 | grep -v "Loading weights" > $OUT/latency.log; tail -14 $OUT/latency.log
echo "latency took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 130 python3 -m experiments.bench_throughput --model /tmp/smol-rand --rows batched --episodes 512 --num-envs 256 --out $OUT/tp256.json 2>&1 | grep -v "Loading weights" > $OUT/tp256.log; tail -8 $OUT/tp256.log
echo "tp256 took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 80 python3 .gpu/prof_vec.py 64 /tmp/smol-rand 2>&1 | grep -v "Loading weights" > $OUT/prof.log; head -80 $OUT/prof.log
echo "prof took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 45 python3 -m experiments.bench_cache --model /tmp/smol-rand --contexts 1024 --new-tokens 32 --repeats 3 --caches dynamic ours-mixed ours-mixed-kept --out $OUT/cache.json --no-progress 2>&1 | grep -v "Loading weights" | tail -12 > $OUT/cache.log; cat $OUT/cache.log
echo "cache took $(( $(date +%s) - S )) s"
