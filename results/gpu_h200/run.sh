# One device run: wheels, a random-weight SmolLM2-135M (same config and tokenizer), the CUDA tests, throughput, latency.
export PYTHONUNBUFFERED=1 WANDB_MODE=offline KVGYM_HELLASWAG=$PWD/.gpu/hellaswag_val.jsonl KVGYM_CACHE=/tmp/kvgym TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 .gpu/make_random.py /tmp/smol-rand 2>&1 | tail -1
S=$(date +%s)
timeout 130 python3 -m pytest -q -p no:cacheprovider --timeout 100 tests/envs/test_cuda.py tests/envs/test_device.py 2>&1 | tail -30 > $OUT/pytest.log; cat $OUT/pytest.log
echo "pytest took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 170 python3 -m experiments.bench_throughput --model /tmp/smol-rand --rows batched --episodes 256 --num-envs 128 --out $OUT/tp128.json 2>&1 | grep -v "Loading weights" > $OUT/tp128.log; tail -20 $OUT/tp128.log
echo "tp128 took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 140 python3 -m experiments.bench_throughput --model /tmp/smol-rand --rows single sync batched --episodes 16 --num-envs 16 --out $OUT/tp16.json 2>&1 | grep -v "Loading weights" > $OUT/tp16.log; tail -20 $OUT/tp16.log
echo "tp16 took $(( $(date +%s) - S )) s"; S=$(date +%s)
timeout 80 python3 -m experiments.bench_latency --model /tmp/smol-rand --context 1024 --new-tokens 32 --repeats 3 --widths 4 2 --out $OUT/latency.json --no-progress 2>&1 | grep -v "Loading weights" > $OUT/latency.log; tail -14 $OUT/latency.log
echo "latency took $(( $(date +%s) - S )) s"
