"""The drafter's configuration: one frozen dataclass for every method."""
from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("dspark", "dflash", "eagle3", "mtp1")
# training: float32, the forward under bfloat16 autocast, or bf16 where the device has it natively
PRECISIONS = ("fp32", "bf16", "auto")
HEADS = ("markov", "rnn", "none")


@dataclass(frozen=True)
class DrafterConfig:
    method: str  # dspark | dflash | eagle3 | mtp1
    target: str  # name of the target model these weights belong to
    hidden_size: int  # d, equal to the target's: context features and the shared embedding live there
    feature_layers: tuple[int, ...]  # target layer outputs fused into the context (DSPARK.md §2)
    draft_vocab: int  # size of the draft vocabulary (a subset of the target's, ids stored beside)
    target_vocab: int  # the target's vocabulary size
    head: str = "none"  # dspark's sequential head: markov | rnn; "none" for the others
    block_size: int = 7  # gamma: tokens drafted per round (mtp1: 1)
    num_layers: int = 2  # backbone depth (equal across methods for a fair comparison)
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 768  # MLP width; small keeps shipped weights small
    head_rank: int = 64  # r of the Markov/RNN heads (paper: 256 for a 150k vocabulary)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # the target's

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if (self.method == "dspark") != (self.head != "none"):
            raise ValueError("dspark needs a markov or rnn head; the other methods have none")
        if self.method == "mtp1" and self.block_size != 1:
            raise ValueError("mtp1 drafts one token per round (block_size 1)")
        if self.block_size < 1 or self.num_layers < 1:
            raise ValueError("block_size and num_layers must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def parallel(self) -> bool:
        """dspark/dflash draft the whole block in one backbone pass; eagle3/mtp1 run a chain."""
        return self.method in ("dspark", "dflash")

    @property
    def has_confidence(self) -> bool:
        return self.method == "dspark"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["feature_layers"] = list(self.feature_layers)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> DrafterConfig:
        return cls(**{**d, "feature_layers": tuple(d["feature_layers"])})
