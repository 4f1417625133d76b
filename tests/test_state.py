import pytest
import torch

import gist_fast
from tiny import images, tiny_vit


def _trained(peft="adapter", gist=True, channels=None):
    model = gist_fast.patch(tiny_vit(), peft=peft, gist=gist, channels=channels, verbose=False).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(images())
    loss = (gist_fast.GistLoss()(out, torch.tensor([0, 1, 2])) if gist
            else torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])))
    loss.backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize("peft,gist", [("adapter", True), ("seq-adapter", False), ("ln", False), ("channels", True)])
@pytest.mark.parametrize("prepatch", [True, False])
def test_round_trip_reproduces_outputs(tmp_path, peft, gist, prepatch):
    channels = [[3, 9], [0, 47]] if peft == "channels" else None
    model = _trained(peft, gist, channels)
    path = tmp_path / "ckpt.pt"
    torch.save(gist_fast.trainable_state_dict(model), path)
    assert path.stat().st_size < 100_000  # trainable tensors only
    fresh = tiny_vit()  # same seed: the same frozen backbone, as with pretrained weights
    if prepatch:
        gist_fast.patch(fresh, peft=peft, gist=gist, channels=channels, verbose=False)
    gist_fast.load_trainable_state_dict(fresh, torch.load(path))
    fresh.eval()
    x = images(batch=4, seed=7)
    assert torch.equal(fresh(x), model(x))


def test_state_holds_only_trainable_tensors_and_config():
    sd = gist_fast.trainable_state_dict(_trained())
    assert sd["gist_fast_config"]["peft"] == "adapter" and sd["gist_fast_config"]["gist"] is True
    assert set(sd["state_dict"]) == {"gist_token", "head.weight", "head.bias"} | {
        f"blocks.{i}.adapter.{proj}.{w}" for i in range(2) for proj in ("down", "up") for w in ("weight", "bias")}


def test_load_errors():
    sd = gist_fast.trainable_state_dict(_trained())
    with pytest.raises(ValueError, match="patched differently"):
        gist_fast.load_trainable_state_dict(gist_fast.patch(tiny_vit(), peft="seq-adapter", verbose=False), sd)
    with pytest.raises(ValueError, match="not a gist_fast checkpoint"):
        gist_fast.load_trainable_state_dict(tiny_vit(), {"weights": {}})
    with pytest.raises(ValueError, match="different model size or class count"):
        gist_fast.load_trainable_state_dict(tiny_vit(num_classes=9), sd)
