"""Where a step of the batched env spends its time on the GPU: cProfile of one pass over N held-out rows."""
import cProfile, pstats, sys, time
import gymnasium as gym, numpy as np, torch
import envs
n, model = int(sys.argv[1]), sys.argv[2]
vec = gym.make_vec(envs.ENV_ID, num_envs=n, vectorization_mode="vector_entry_point", model=model, split="eval")
acts = np.full(n, list(vec.envs[0].bits).index(4))
rows = [it.row for it in vec.envs[0].items[:n]]
for measured in (False, True):
    pr = cProfile.Profile(); t0 = time.perf_counter(); pr.enable() if measured else None
    vec.reset(options={"rows": rows}); k = 0
    while not vec.idle.all():
        vec.step(acts); k += 1
        if torch.cuda.is_available(): torch.cuda.synchronize()
    pr.disable() if measured else None
    print("measured" if measured else "warm-up", "steps", k, "episodes", n, "wall", round(time.perf_counter() - t0, 2))
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(r"/main/(envs|quant|agents)", 40)
st.sort_stats("tottime").print_stats(15)
