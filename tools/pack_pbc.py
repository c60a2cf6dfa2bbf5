"""Pack the PBC folders into a compact file for training on a lent GPU machine.

Why: the GPU machine gets at most 64 MiB of our working tree and cannot see
../shared. Each image goes through the library's own decode and resize
(``wbc_batch.imaging``), then is re-encoded as JPEG (quality 90) only to
travel; the test split is left out (it is evaluated here on the exact
classify-path preprocessing). The split itself is written beside it.

Usage: python tools/pack_pbc.py DATA_DIR OUT_DIR [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wbc_batch.imaging import ImageDecodeError, decode_image, encode_jpeg, is_image_name, resize_for_model  # noqa: E402
from wbc_batch.splits import LabelledImage, assign_splits, label_for_folder, sha256_hex  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args()
    items: list[LabelledImage] = []
    blobs: dict[str, bytes] = {}
    for folder in sorted(os.listdir(args.data)):
        d = os.path.join(args.data, folder)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if not is_image_name(name):
                continue
            path = os.path.join(d, name)
            data = open(path, "rb").read()
            uri = os.path.relpath(path, args.data)
            items.append(LabelledImage(uri, sha256_hex(data), label_for_folder(folder), folder))
            blobs[uri] = data
    splits = assign_splits(items)

    def work(item: LabelledImage) -> tuple[LabelledImage, bytes | None]:
        try:
            rgb = decode_image(blobs[item.uri])
        except ImageDecodeError as exc:
            print(f"warning: skipping {item.uri}: {exc}", file=sys.stderr)
            return item, None
        return item, encode_jpeg(resize_for_model(rgb, args.image_size), args.quality)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, items))
    kept = [(it, b) for it, b in results if b is not None]
    classes = sorted({it.label for it, _ in kept})
    os.makedirs(args.out, exist_ok=True)
    split_rows = [
        {"uri": it.uri, "sha256": it.sha256, "label": it.label, "split": splits[it.sha256]} for it, _ in kept
    ]
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump({"classes": classes, "items": split_rows}, f)
    travel = [(it, b) for it, b in kept if splits[it.sha256] != "test"]
    lengths = np.array([len(b) for _, b in travel], dtype=np.int64)
    np.savez(
        os.path.join(args.out, "pack.npz"),
        jpeg=np.frombuffer(b"".join(b for _, b in travel), dtype=np.uint8),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        labels=np.array([classes.index(it.label) for it, _ in travel], dtype=np.int32),
        is_val=np.array([splits[it.sha256] == "val" for it, _ in travel]),
        classes=np.array(classes),
    )
    counts = {s: sum(1 for r in split_rows if r["split"] == s) for s in ("train", "val", "test")}
    print(json.dumps({"classes": classes, "splits": counts, "packed": len(travel), "bytes": int(lengths.sum())}))


if __name__ == "__main__":
    main()
