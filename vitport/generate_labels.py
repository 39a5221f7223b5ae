"""Regenerate ``imagenet_labels.json`` from the installed timm (dev tool; needs timm).

    uv run python -m vitport.generate_labels

Records, for every class count timm maps to an ImageNet subset
(``timm.data.infer_imagenet_subset``), the subset's class names in order (WordNet synsets,
``timm.data.ImageNetInfo(subset).label_names()``) and each synset's description (its
lemmas, ``label_descriptions()``), so ``vitport.labels`` labels predictions without timm.
``tests/test_images.py`` fails when this file and the installed timm disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from .labels import LABELS_PATH


def generate() -> dict:
    import timm
    from timm.data import ImageNetInfo, infer_imagenet_subset
    # timm keeps its class-count table private; the public function is checked against it below.
    from timm.data.imagenet_info import _NUM_CLASSES_TO_SUBSET

    subsets, by_num_classes, descriptions = {}, {}, {}
    for num_classes, subset in sorted(_NUM_CLASSES_TO_SUBSET.items()):
        assert infer_imagenet_subset({"num_classes": num_classes}) == subset
        info = ImageNetInfo(subset)
        names = info.label_names()
        assert len(names) == num_classes, (subset, len(names))
        subsets[subset] = names
        by_num_classes[str(num_classes)] = subset
        descriptions.update(zip(names, info.label_descriptions()))
    return {"timm_version": timm.__version__, "num_classes_to_subset": by_num_classes,
            "subsets": subsets, "descriptions": descriptions}


def dumps(table: dict) -> str:
    return json.dumps(table, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    table = generate()
    Path(LABELS_PATH).write_text(dumps(table), encoding="utf-8")
    sizes = ", ".join(f"{k} ({len(v)})" for k, v in table["subsets"].items())
    print(f"wrote {LABELS_PATH}: {sizes}; {len(table['descriptions'])} descriptions")


if __name__ == "__main__":
    main()
