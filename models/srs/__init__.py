"""SRS backbones behind one contract (see `models.srs.base`): SASRec, GRU4Rec, Bert4Rec.

Each class has `objective`: "next" (every position predicts the next item; batch seq/pos/neg) or "cloze"
(masked positions predict their item; batch seq/labels). Training jobs build batches by objective.
"""

from __future__ import annotations

from models.srs.base import (
    FrozenTableEncoder,
    IDEncoder,
    ItemEncoder,
    SRSBackbone,
    SRSConfig,
    flat_targets,
    pad_left,
    target_rows,
)
from models.srs.bert4rec import Bert4Rec
from models.srs.gru4rec import GRU4Rec
from models.srs.sasrec import SASRec

BACKBONES: dict[str, type[SRSBackbone]] = {"sasrec": SASRec, "gru4rec": GRU4Rec, "bert4rec": Bert4Rec}


def build_backbone(name: str, config: SRSConfig, item_encoder: ItemEncoder | None = None) -> SRSBackbone:
    """Instantiate backbone `name` ("sasrec" | "gru4rec" | "bert4rec"); item_encoder None -> a fresh ID table."""
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
    return cls(config, item_encoder)


__all__ = [
    "BACKBONES",
    "Bert4Rec",
    "FrozenTableEncoder",
    "GRU4Rec",
    "IDEncoder",
    "ItemEncoder",
    "SASRec",
    "SRSBackbone",
    "SRSConfig",
    "build_backbone",
    "flat_targets",
    "pad_left",
    "target_rows",
]
