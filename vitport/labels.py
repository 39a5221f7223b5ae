"""Class labels for predictions, chosen as timm chooses them, without timm at run time.

A checkpoint's own ``label_names`` (with ``label_descriptions`` when it has them) come first;
otherwise the number of classes picks an ImageNet subset as ``timm.data.infer_imagenet_subset``
does (1000 -> imagenet-1k, 21841 -> imagenet-22k, 11821 -> imagenet-12k, ...), whose class
names and descriptions ``imagenet_labels.json`` holds (generated from timm's ``ImageNetInfo``
by ``python -m vitport.generate_labels``). A model whose classes match no known set gets
``"class 17"``-style labels: a guess could only be a wrong name.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

LABELS_PATH = Path(__file__).with_name("imagenet_labels.json")


@functools.cache
def imagenet_table() -> dict[str, Any]:
    return json.loads(LABELS_PATH.read_text(encoding="utf-8"))


def imagenet_subset(num_classes: int | None) -> str | None:
    """timm's ``infer_imagenet_subset``: the ImageNet subset a class count means, or None."""
    return imagenet_table()["num_classes_to_subset"].get(str(num_classes))


def class_names(pretrained_cfg: Mapping[str, Any], num_classes: int) -> Sequence[str] | None:
    """The checkpoint's ``label_names`` if they fit ``num_classes``, else the ImageNet subset's
    synsets for that class count, else None."""
    names = pretrained_cfg.get("label_names")
    if names is not None and len(names) == num_classes:
        return list(names)
    subset = imagenet_subset(num_classes)
    return imagenet_table()["subsets"][subset] if subset else None


def class_labels(pretrained_cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """A readable label per class: the description of its name where one is known (the
    checkpoint's ``label_descriptions``, a dict by name as timm writes it or a list by index;
    then WordNet lemmas for ImageNet synsets), else the name, else ``"class i"``."""
    names = class_names(pretrained_cfg, num_classes)
    if names is None:
        return [f"class {i}" for i in range(num_classes)]
    own = pretrained_cfg.get("label_descriptions")
    if isinstance(own, (list, tuple)):
        own = dict(zip(names, own)) if len(own) == len(names) else None
    known = imagenet_table()["descriptions"]
    return [(own or {}).get(n) or known.get(n) or str(n) for n in names]
