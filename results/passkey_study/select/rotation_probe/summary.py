"""Summary of the rotation probe: means per variant, the simulation check against the real records, paired rot - sim (95% t-interval)."""
import json,glob,collections,numpy as np
by=collections.defaultdict(dict)
for f in glob.glob('results/passkey_study/select/rotation_probe/records_*.jsonl'):
    for l in open(f):
        r=json.loads(l); by[r['policy']][r['row']]=r
ref={}
for l in open('results/passkey_study/select/pool/records.jsonl'):
    r=json.loads(l); ref.setdefault(r['policy'],{})[r['row']]=r
rows=sorted(set.intersection(*[set(d) for d in by.values()]))
print(len(rows), 'items')
for p in sorted(by):
    d=by[p]
    print(f"{p:14s} acc={np.mean([d[r]['correct'] for r in rows]):.3f} dll={np.mean([d[r]['loglik_delta'] for r in rows]):+.3f} bits={np.mean([d[r]['avg_bits'] for r in rows]):.3f}")
for name,refname in (('2+s4','fixed:2+s4'),('select@4','select-p4-b2.5')):
    print('sim vs real', name, max(abs(by['sim-'+name][r]['loglik_delta']-ref[refname][r]['loglik_delta']) for r in rows))
    d=np.array([by['rot-'+name][r]['loglik_delta']-by['sim-'+name][r]['loglik_delta'] for r in rows])
    a=np.array([by['rot-'+name][r]['correct']-by['sim-'+name][r]['correct'] for r in rows])
    from scipy import stats
    ci=stats.t.interval(0.95, len(d)-1, loc=d.mean(), scale=stats.sem(d))
    print('rot - sim', name, f"{d.mean():+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]", f"dacc {a.mean():+.3f}")
print('fp16 acc', np.mean([ref['fp16'][r]['correct'] for r in rows]))
