import warnings, torch, torch.nn as nn
torch.set_num_threads(1)
from litcompress.pruning import GradualPruner, make_permanent_
from litcompress.pruning.engine import mask_of
from litcompress.pruning.schedules import PolynomialDecay
warnings.simplefilter("always")
def build(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    nn.init.dirac_(m[1].weight[:, :8]) if False else None
    with torch.no_grad():
        m[1].weight[:, :, 0, 0] = 0  # legitimate zeros in every channel (e.g. a kernel initialised with a hole)
    return m
for method, kw in (("ln_structured", dict(n=2, dim=0)), ("random_unstructured", {})):
    res = {}
    for perm in (False, True):
        m = build()
        p = GradualPruner([(m[0], "weight"), (m[1], "weight")], PolynomialDecay(final_sparsity=0.75, begin=0, end=2, frequency=1),
                          method, scope="local", **kw)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p.step(0); p.step(1)
            if perm: make_permanent_(m)
            p.step(2)
        masks = [mask_of(m[i], "weight") for i in range(2)]
        rows = [int((mk.flatten(1).sum(1) == 0).sum()) for mk in masks]
        res[perm] = masks
        print(method, "permanent-between" if perm else "uninterrupted", "pruned entries:", [int((mk == 0).sum()) for mk in masks],
              "pruned rows:", rows, "history:", [(h['target'], h['pruned_after']) for h in p.history],
              "warnings:", [str(x.message)[:70] for x in w])
    print("  same masks:", all(torch.equal(a, b) for a, b in zip(res[False], res[True])))
