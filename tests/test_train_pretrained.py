"""--pretrained-file loads a local timm checkpoint (.pth, .safetensors) through timm's own loader,
keeps a fresh head, and refuses a file that does not fit the model."""
import pytest
import timm
import torch

from gist_fast.training import models

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_is_loaded(tmp_path, suffix):
    torch.manual_seed(123)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **KW)
    state = source.state_dict()
    path = str(tmp_path / f"backbone{suffix}")
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    model = models.backbone("vit_tiny_patch16_224", KW, num_classes=7, drop_path=0.0, seed=0, pretrained_file=path)
    loaded = model.state_dict()
    for name, t in state.items():
        if not name.startswith("head."):
            assert torch.equal(loaded[name], t), name
    assert model.head.weight.shape == (7, 48)  # the fine-tuning head is new


def test_a_file_for_another_model_is_refused(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="other.pth"):
        models.backbone("vit_tiny_patch16_224", KW, num_classes=7, drop_path=0.0, seed=0, pretrained_file=path)


@pytest.mark.parametrize("change, expected", [(dict(depth=3), "has tensors the model does not: \\['blocks.2"),
                                              (dict(embed_dim=96), "size mismatch for")])
def test_a_deeper_or_wider_file_is_refused_in_one_line(tmp_path, change, expected):
    """A file with extra blocks used to load partially (timm only logs its unexpected keys)."""
    path = str(tmp_path / "other.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=1000, **{**KW, **change}).state_dict(), path)
    with pytest.raises(ValueError, match=expected) as e:
        models.backbone("vit_tiny_patch16_224", KW, num_classes=7, drop_path=0.0, seed=0, pretrained_file=path)
    assert "\n" not in str(e.value)
