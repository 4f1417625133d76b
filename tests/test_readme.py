"""The README's quick start runs as written (timm's download swapped for the same architecture's random weights)."""
import os
import re

import torch

import gist_fast

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", open(README).read(), re.S).group(1)
    assert "pretrained=True" in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.replace("pretrained=True", "pretrained=False"), "README.md", "exec"), scope)
    assert scope["logits"].shape == (8, 100) and torch.isfinite(scope["loss"])
    assert scope["model"].gist_token.grad is not None
    saved = torch.load(tmp_path / "gist.pt")
    assert saved["gist_fast_config"]["peft"] == "adapter" and "gist_token" in saved["state_dict"]
    assert gist_fast.parameter_summary(scope["model"]).trainable == 82_992 + 768 + 769 * 100
