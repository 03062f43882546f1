"""niwt_nb.distributed on 2 CPU processes (torchrun, gloo) against one process.

Two torchrun jobs (~10 s each on 2 shared cores): the data-parallel fine-tuning + alpha extraction job of the module,
with a batch size that splits every batch unevenly over the ranks, and a GlobalBatchNorm check with uneven shards.

Why tolerances and not equality: two ranks sum the same numbers in a different order (gradient all-reduce, BatchNorm
statistics over shards, convolutions on half batches), so floats differ in the last bits, and Adam, which divides by the
running RMS of each gradient, amplifies that for parameters whose gradients are near zero. Integer results (accuracies,
counts, early-stopping decisions, image order) must be identical.
"""
import subprocess, sys, textwrap
import pytest
import torch
from torch import nn

from niwt_nb.distributed import launch
from niwt_nb.models import ModelConfig, TrainConfig, build_model, train_seen
from niwt_nb.importance import ImportanceConfig, extract_alphas
from niwt_nb.shapes import ShapesConfig, make_shapes

pytestmark = pytest.mark.xdist_group("torchrun")

JOB = dict(n_classes=10, n_per_class=16, size=16, width=8, epochs=2, bs=25, lr=3e-3, seed=0)


def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    launch(2, out, timeout=120, **JOB)
    two = torch.load(out, weights_only=True)
    # the same job on one process with the single-process functions
    data = make_shapes(ShapesConfig(n_classes=10, n_unseen=3, n_val_classes=1, n_per_class=16, size=16, seed=0), cache=False)
    assert len(data.splits["train"]) % JOB["bs"] != 0                               # an uneven last batch too
    ref, hist = train_seen(build_model(ModelConfig(width=8, seed=0), len(data.seen)), data,
                           TrainConfig(epochs=2, bs=25, lr=3e-3, seed=0))
    res = extract_alphas(ref, data, "trainval", ImportanceConfig(bs=25))
    assert two["world_size"] == 2
    assert two["threads_after"] == []          # no gloo thread outlives the process group (they once aborted a rank at exit)
    assert two["history"]["val_acc"] == hist["val_acc"] and two["history"]["train_acc"] == hist["train_acc"]
    assert two["history"]["best_epoch"] == hist["best_epoch"]
    torch.testing.assert_close(torch.tensor(two["history"]["train_loss"]), torch.tensor(hist["train_loss"]), atol=1e-5, rtol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(two["state"][k], v, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert torch.equal(two["idx"], res["idx"]) and torch.equal(two["labels"], res["labels"]) and torch.equal(two["counts"], res["counts"])
    torch.testing.assert_close(two["alphas"], res["alphas"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(two["class_mean"], res["class_mean"], atol=1e-4, rtol=1e-3)


BN_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch import nn
    from niwt_nb.distributed import GlobalBatchNorm, process_group, _shard
    with process_group("gloo") as (rank, world):
        g = torch.Generator().manual_seed(0)
        x, r = torch.randn(7, 3, 4, 5, generator=g), torch.randn(7, 3, 4, 5, generator=g)   # global batch, loss weights
        bn = GlobalBatchNorm(3, momentum=0.2).train()
        with torch.no_grad(): bn.weight.uniform_(0.5, 1.5, generator=g); bn.bias.normal_(generator=g)
        sh = _shard(7, rank, world)                                                        # 3 and 4 images
        xr = x[sh].clone().requires_grad_(True)
        y = bn(xr); (y * r[sh]).sum().backward()
        gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
        dist.all_reduce(gw); dist.all_reduce(gb)                                           # as DDP would (summed)
        parts = [torch.zeros(4, 3, 4, 5) for _ in range(world)]; pad = torch.zeros(4, 3, 4, 5); pad[:len(xr)] = xr.grad
        dist.all_gather(parts, pad)
        if rank == 0:
            gx = torch.cat([p[:_shard(7, k, world).stop - _shard(7, k, world).start] for k, p in enumerate(parts)])
            torch.save({"gx": gx, "gw": gw, "gb": gb, "rm": bn.running_mean, "rv": bn.running_var, "y0": y.detach()}, sys.argv[1])
''')


def test_global_batchnorm_two_uneven_ranks(tmp_path):
    script, out = tmp_path / "bn.py", tmp_path / "bn.pt"
    script.write_text(BN_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 3, 4, 5, generator=g), torch.randn(7, 3, 4, 5, generator=g)
    bn = nn.BatchNorm2d(3, momentum=0.2).train()
    with torch.no_grad(): bn.weight.uniform_(0.5, 1.5, generator=g); bn.bias.normal_(generator=g)
    x.requires_grad_(True)
    y = bn(x); (y * w).sum().backward()
    torch.testing.assert_close(got["y0"], y.detach()[:3], atol=1e-5, rtol=1e-5)             # rank 0's block
    torch.testing.assert_close(got["gx"], x.grad, atol=1e-5, rtol=1e-4)                     # gradients through the stats
    torch.testing.assert_close(got["gw"], bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["gb"], bn.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["rm"], bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["rv"], bn.running_var, atol=1e-6, rtol=1e-6)


def test_launch_reports_worker_errors(tmp_path):
    with pytest.raises(RuntimeError, match="torchrun failed"):
        launch(1, tmp_path / "x.pt", timeout=60, n_classes=2)                            # ShapesConfig refuses 2 classes
    from niwt_nb.core import NIWTInputError
    with pytest.raises(NIWTInputError, match="`nproc`"): launch(0, tmp_path / "x.pt")


def test_file_images_match_in_memory(tmp_path):
    "Image files take the per-rank `data.dataset(idx)` path: same fine-tuning and alphas as train_seen/extract_alphas (one process)."
    import dataclasses
    from PIL import Image
    from niwt_nb.data import make_toy_data
    from niwt_nb.distributed import train_seen_ddp, extract_alphas_ddp
    mem = make_toy_data(n_cls=6, n_unseen=2, n_per_class=10, size=16)
    paths = []
    for i, im in enumerate(mem.images):
        p = tmp_path / f"{i}.png"; Image.fromarray(im.permute(1, 2, 0).numpy()).save(p); paths.append(str(p))
    files = dataclasses.replace(mem, images=paths)
    cfg, mcfg = TrainConfig(epochs=2, bs=7, lr=3e-3), ModelConfig(width=4)
    ref, h_ref = train_seen(build_model(mcfg, len(mem.seen)), mem, cfg)
    got, h = train_seen_ddp(build_model(mcfg, len(mem.seen)), files, cfg)
    assert h["val_acc"] == h_ref["val_acc"]
    for k, v in ref.state_dict().items(): torch.testing.assert_close(got.state_dict()[k], v, atol=1e-4, rtol=1e-4)
    a_ref = extract_alphas(ref, mem, "trainval", ImportanceConfig(bs=6))
    a = extract_alphas_ddp(ref, files, "trainval", ImportanceConfig(bs=6))
    torch.testing.assert_close(a["alphas"], a_ref["alphas"], atol=1e-5, rtol=1e-4)
    assert torch.equal(a["labels"], a_ref["labels"])


def test_both_entry_points_share_one_loop_on_one_process(tmp_path):
    "train_seen and train_seen_ddp run models.fit_epochs: on one process (no group) the same history and weights up to rounding."
    from niwt_nb.distributed import train_seen_ddp, GlobalBatchNorm
    data = make_shapes(ShapesConfig(n_classes=10, n_unseen=3, n_val_classes=1, n_per_class=16, size=16, seed=0), cache=False)
    cfg = TrainConfig(epochs=3, bs=25, lr=3e-3, seed=0, head_epochs=1, patience=1)
    one, h1 = train_seen(build_model(ModelConfig(width=8, seed=0), len(data.seen)), data, cfg)
    ddp, h2 = train_seen_ddp(build_model(ModelConfig(width=8, seed=0), len(data.seen)), data, cfg, ckpt_path=tmp_path / "ck.pt")
    for k in ("epoch", "phase", "val_acc", "train_acc", "best_epoch", "stopped_early"): assert h1[k] == h2[k], k
    torch.testing.assert_close(torch.tensor(h2["train_loss"]), torch.tensor(h1["train_loss"]), atol=1e-5, rtol=1e-5)
    for k, v in one.state_dict().items(): torch.testing.assert_close(ddp.state_dict()[k], v, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert not any(isinstance(m, GlobalBatchNorm) for m in ddp.modules()) and not ddp.training
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["epoch"] == h2["best_epoch"] and ck["world_size"] == 1 and all(torch.equal(v, ddp.state_dict()[k]) for k, v in ck["model"].items())
