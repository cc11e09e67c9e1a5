import torch
BH, R, n, gr, spare, groups = 6, 10, 4, 3, 11, 4
def f_flat(rows):
    ids = torch.where(rows < 0, 10, rows).reshape(BH, R * n)
    key = ids + torch.arange(BH, device="cuda")[:, None] * (groups * spare)
    row = torch.arange(R * n, device="cuda")[None, :] // n
    return (key + row // gr * spare).flatten()
def f_3d(rows):
    ids = torch.where(rows < 0, 10, rows).reshape(BH, R, n)
    g = torch.arange(R, device="cuda") // gr
    key = ids + torch.arange(BH, device="cuda")[:, None, None] * (groups * spare) + (g * spare)[None, :, None]
    return key.flatten()
def f_table(rows):
    ids = torch.where(rows < 0, 10, rows).reshape(BH, R, n)
    g = torch.tensor([r // gr for r in range(R)], device="cuda")
    key = ids + torch.arange(BH, device="cuda")[:, None, None] * (groups * spare) + (g * spare)[None, :, None]
    return key.flatten()
rows = torch.randint(-1, 10, (2, 3, R, n), device="cuda")
for f in (f_flat, f_3d, f_table):
    torch._dynamo.reset()
    a = torch.compile(f, fullgraph=True)(rows); b = f(rows)
    print(f.__name__, torch.equal(a, b), (a != b).sum().item())
