"""The PEFT kinds patch() knows, one file each (their modules and timm-Block forwards, METHODS §1-§3), and
KINDS: the registry that says, per kind, what patch() inserts, which forward it binds and what trains."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from torch import nn

from gist_fast.lean_block import GistResidual, PlainResidual
from gist_fast.peft.adapter import Adapter, adaptformer_forward, gist_adapter_forward, make_adapter, seq_adapter_forward
from gist_fast.peft.channels import ChannelLinear, channels_forward, make_channels


@dataclass(frozen=True)
class PeftKind:
    """Everything patch() needs to know of one PEFT kind: adding a kind is one entry in KINDS (and its module
    and block forward in a file of this package)."""

    name: str
    module: Optional[str] = None           # the block attribute holding its per-block module
    make: Optional[Callable[[Any, int, int], nn.Module]] = None  # (patch config, dim, block index) -> module
    group: str = ""                        # its tensors' group in parameter_summary
    forward: Optional[Callable] = None     # the eager block forward; None: timm's own
    lean: Optional[type] = None            # its first-residual step in gist_fast.lean_block; None: no lean path
    scale: Optional[float] = None          # the default scale of an adapter kind
    trains_norms: bool = False             # the LayerNorm affine parameters train too
    takes_gist: bool = True                # can carry the Gist token and its loss

    @property
    def is_adapter(self) -> bool:
        return self.scale is not None


KINDS: Dict[str, PeftKind] = {k.name: k for k in (
    PeftKind("adapter", "adapter", make_adapter, "adapters", gist_adapter_forward, lean=GistResidual, scale=0.1),
    PeftKind("seq-adapter", "adapter", make_adapter, "adapters", seq_adapter_forward, scale=1.0),
    PeftKind("adaptformer", "adapter", make_adapter, "adapters", adaptformer_forward, lean=PlainResidual, scale=0.1),
    PeftKind("ln", trains_norms=True),
    PeftKind("channels", "channel_linear", make_channels, "channels", channels_forward, trains_norms=True),
    PeftKind("linear"),
)}

__all__ = ["PeftKind", "KINDS", "Adapter", "ChannelLinear"]
