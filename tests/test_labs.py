"""Several labs in one training run: naming, splitting by groups, balancing, masking, recording, replaying."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from wbc_batch import imaging, splits
from wbc_batch.model import SPLIT_FILE, load_artifact
from wbc_batch.training import labs as lab_rules
from wbc_batch.training.adapt import AdaptConfig, _replay_rows, replay_labs, run_adaptation
from wbc_batch.training.labs import Lab

FIVE = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")  # a lab without ig or non_wbc


def _item(lab: str, group: str, n: int, label: str) -> splits.LabelledImage:
    name = f"{group}_{n}.jpg"
    return splits.LabelledImage(f"{label}/{name}", f"{lab}-{name}", label, label, lab, group)


def _synthetic_three_labs() -> tuple[list[splits.LabelledImage], list[Lab]]:
    """A big lab split by file with seven classes, two small ones split by group with five."""
    items = [splits.LabelledImage(f"{c}/{c}{i}.jpg", f"big-{c}{i}", c, c, "big", f"{c}{i}.jpg")
             for c in (*FIVE, "ig", "non_wbc") for i in range(60)]
    for lab, sizes in (("slides", (12, 5, 3, 2, 2)), ("cells", (4, 4, 3, 3, 2, 2, 2, 1))):
        for c in FIVE:
            items += [_item(lab, f"{lab[0]}{c[:2]}{g}", n, c) for g, size in enumerate(sizes) for n in range(size)]
    return items, [Lab("big", "/big"), Lab("slides", "/slides", "prefix"), Lab("cells", "/cells", "prefix")]


def test_a_group_never_falls_on_both_sides_and_every_small_class_gets_a_held_out_group() -> None:
    items, labs = _synthetic_three_labs()
    split_of = lab_rules.split_by_lab(items, labs)
    assert lab_rules.groups_on_both_sides(items, split_of) == []
    for lab in ("slides", "cells"):
        for c in FIVE:
            sides = Counter(split_of[i.sha256] for i in items if i.lab == lab and i.label == c)
            assert set(sides) == {"train", "val", "test"}, (lab, c, sides)
            assert sides["train"] > sides["val"] and sides["train"] > sides["test"]


def test_groups_are_placed_largest_first_on_the_side_that_lacks_most() -> None:
    items = [_item("chula", g, n, "neutrophil") for g, size in (("N-3B", 70), ("N-2B", 24), ("N-1B", 8))
             for n in range(size)]
    items.append(_item("chula", "B-30", 0, "basophil"))  # a class of one slide trains on it
    got = lab_rules.assign_group_splits(items)
    side = {i.group: got[i.sha256] for i in items}
    assert side == {"N-3B": "train", "N-2B": "val", "N-1B": "test", "B-30": "train"}


def test_a_lab_split_by_file_keeps_the_split_it_had_alone() -> None:
    items, labs = _synthetic_three_labs()
    big = [i for i in items if i.lab == "big"]
    together = lab_rules.split_by_lab(items, labs)
    assert {i.sha256: together[i.sha256] for i in big} == splits.assign_splits(big)


def test_every_lab_gets_its_share_of_an_epoch_whatever_its_size() -> None:
    import tensorflow as tf

    from wbc_batch.training.worker import lab_balanced_stream

    labs = np.array([0] * 600 + [1] * 40 + [2] * 8)
    stream = lab_balanced_stream(tf, (np.arange(len(labs)), labs), labs, seed=7)
    drawn = [int(lab) for _, lab in stream.take(3000).as_numpy_iterator()]
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.04), shares
    one_lab = lab_balanced_stream(tf, (np.arange(10), np.zeros(10, np.int64)), np.zeros(10, np.int64), seed=7)
    assert sorted(int(i) for i, _ in one_lab.take(10).as_numpy_iterator()) == list(range(10))  # a plain shuffle


def test_a_lab_without_a_class_gives_no_loss_for_it() -> None:
    import tensorflow as tf

    from wbc_batch.training.loss import cross_entropy

    logits = tf.Variable([[2.0, -1.0, 0.5, 3.0], [0.1, 0.2, 0.3, 0.4]])
    labels = tf.constant([0, 2])
    mask = tf.constant([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # the lab has no class 3
    for smoothing in (0.0, 0.1):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(cross_entropy(tf, labels, logits, smoothing, mask))
        grad = tape.gradient(loss, logits).numpy()
        assert np.all(grad[:, 3] == 0.0)  # neither pushed down nor up
        plain = cross_entropy(tf, labels, logits[:, :3], smoothing).numpy()  # the loss over the lab's classes
        np.testing.assert_allclose(cross_entropy(tf, labels, logits, smoothing, mask).numpy(), plain, rtol=1e-6)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(cross_entropy(tf, labels, logits))
    assert np.all(tape.gradient(loss, logits).numpy()[:, 3] > 0)  # unmasked, the absent class is pushed down


def test_inside_a_lab_every_class_it_has_weighs_the_same_and_a_class_it_lacks_nothing() -> None:
    items, labs = _synthetic_three_labs()
    classes = sorted({i.label for i in items})
    split_of = lab_rules.split_by_lab(items, labs)
    weights = lab_rules.lab_class_weights(items, split_of, labs, classes, {"non_wbc": 2.0})
    masks = lab_rules.class_masks(items, labs, classes)
    ig, non_wbc = classes.index("ig"), classes.index("non_wbc")
    assert masks[0].all() and masks[1][ig] == 0 and masks[2][non_wbc] == 0 and masks[1].sum() == 5
    for row, lab in enumerate(labs):
        train = Counter(classes.index(i.label) for i in items if i.lab == lab.name and split_of[i.sha256] == "train")
        mass = {c: weights[row, c] * n for c, n in train.items()}
        plain = [m / (2.0 if c == non_wbc else 1.0) for c, m in mass.items()]
        assert np.allclose(plain, plain[0])  # each class the same total weight
        assert all(weights[row, c] == 0 for c in range(len(classes)) if c not in train)
    assert lab_rules.lab_shares(labs) == [1 / 3] * 3


def test_labs_are_named_on_the_command_line_or_after_their_folder() -> None:
    got = lab_rules.labs_from(["pbc=/d/pbc", "/d/chula/", "s3://b/x=1/lisc"], {"chula": "prefix"})
    assert got == [Lab("pbc", "/d/pbc"), Lab("chula", "/d/chula/", "prefix"), Lab("lisc", "s3://b/x=1/lisc")]
    with pytest.raises(ValueError, match="more than once"):
        lab_rules.labs_from(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="not labs of this run"):
        lab_rules.labs_from(["a=/x"], {"b": "prefix"})
    with pytest.raises(ValueError, match="unknown split rule"):
        lab_rules.labs_from(["a=/x"], {"a": "slide"})


def test_cli_refuses_a_split_rule_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    from wbc_batch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "a=/x", "out", "--split-by", "a=slide"])
    assert exc.value.code == 2 and "expected LAB=RULE" in capsys.readouterr().err


def _write_lab(samples: Path, dest: Path, per_group: int, recolour: bool) -> None:
    """The bundled samples' five mature classes as another lab: recoloured, ``per_group`` crops per ``gNN_`` group."""
    for cls in FIVE:
        (dest / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((samples / cls).iterdir())):
            rgb = imaging.decode_image(src.read_bytes())
            if recolour:
                rgb = np.ascontiguousarray(rgb[..., ::-1])
            cv2.imwrite(str(dest / cls / f"g{cls[:2]}{i // per_group}_{i}.jpg"),
                        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


@pytest.fixture(scope="module")
def two_lab_model(ray_local: None, samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch of a 32 px network on the bundled samples (lab ``pbc``) and a recoloured copy of five classes
    (lab ``other``, split by group)."""
    from wbc_batch.training import TrainConfig, run_training

    root = tmp_path_factory.mktemp("labs")
    _write_lab(samples_dir, root / "other", per_group=2, recolour=True)
    out = root / "model"
    config = TrainConfig(
        data_uri="", model_out=str(out), workers=1, epochs=1, image_size=32, batch_size=16,
        storage_path=str(root / "checkpoints"), version="0.0.1-labs", command="wbc-batch train pbc=... other=...",
        labs=[Lab("pbc", str(samples_dir)), Lab("other", str(root / "other"), "prefix")],
    )
    return {"summary": run_training(config), "root": root, "out": out}


def _split_rows(model: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((model / SPLIT_FILE).read_text())))


def test_train_on_two_labs_records_labs_digests_command_and_groups(two_lab_model: dict[str, Any]) -> None:
    meta = load_artifact(str(two_lab_model["out"])).meta
    recorded = {lab["name"]: lab for lab in meta.training_data["labs"]}
    assert set(recorded) == {"pbc", "other"}
    assert recorded["other"]["split_rule"] == "prefix" and recorded["pbc"]["split_rule"] == "file"
    assert recorded["other"]["n_images"] == 40 and recorded["other"]["n_groups"] == 20
    assert set(recorded["other"]["class_counts"]["train"]) == set(FIVE)
    assert len(recorded["pbc"]["fingerprint_sha256"]) == 64 != recorded["other"]["fingerprint_sha256"]
    assert meta.training["provenance"]["command"] == "wbc-batch train pbc=... other=..."
    sampling = meta.training["lab_sampling"]
    assert sampling["shares"] == {"pbc": 0.5, "other": 0.5} and sampling["classes"]["other"] == list(FIVE)
    rows = _split_rows(two_lab_model["out"])
    assert {r["lab"] for r in rows} == {"pbc", "other"}
    sides: dict[str, set[str]] = {}
    for r in rows:
        sides.setdefault(f"{r['lab']}/{r['group']}", set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())  # no group on both sides
    assert set(meta.metrics["per_lab"]) <= {"pbc", "other"} and meta.metrics["per_lab"]


def test_adapt_replays_every_lab_of_its_base(two_lab_model: dict[str, Any], tmp_path: Path, samples_dir: Path) -> None:
    """Only ``pbc`` is named: ``other`` is read from the root the base records, and both are replayed."""
    model = str(two_lab_model["out"])
    meta = load_artifact(model).meta
    new_lab = tmp_path / "new"
    _write_lab(samples_dir, new_lab, per_group=1, recolour=False)
    summary = run_adaptation(AdaptConfig(
        data_uri=str(new_lab), model_out=str(tmp_path / "adapted"), base=model, replay=[f"pbc={samples_dir}"],
        replay_per_class=3, epochs=1, batch_size=8, storage_path=str(tmp_path / "checkpoints"), version="t",
    ))
    replay = load_artifact(summary["model_out"]).meta.training["adaptation"]["replay"]
    assert {name for name, _ in replay["labs"]} == {"pbc", "other"}
    assert meta.class_names == load_artifact(summary["model_out"]).meta.class_names
    rows = _split_rows(Path(summary["model_out"]))
    assert {r["lab"] for r in rows} == {"pbc", "other", "new"}  # the new lab's cells are recorded as its own


def test_replay_takes_each_labs_own_training_images(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    rows = []
    for lab in ("a", "b"):
        for split in ("train", "val", "test"):
            folder = tmp_path / lab / "lymphocyte"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{split}_x.jpg"
            shutil.copy(next((Path(__file__).parent.parent / "samples/pbc/lymphocyte").iterdir()), folder / name)
            rows.append(f"{lab}{split},lymphocyte,{split},lymphocyte/{name},{lab},{split}")
    (base / SPLIT_FILE).write_text("sha256,label,split,uri,lab,group\n" + "\n".join(rows) + "\n")
    config = AdaptConfig(data_uri="d", model_out="m", replay=[f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"],
                         replay_per_class=5)
    base_labs = [{"name": "a", "uri": "/gone/a"}, {"name": "b", "uri": "/gone/b"}]
    got = _replay_rows(config, str(base), base_labs, {"lymphocyte": 0}, dict(splits.DEFAULT_LABEL_MAP))
    assert sorted((r["lab"], r["rel"]) for r in got["train"]) == [("a", "lymphocyte/train_x.jpg"),
                                                                   ("b", "lymphocyte/train_x.jpg")]
    assert sorted(r["lab"] for r in got["val"]) == ["a", "b"]
    with pytest.raises(Exception, match="give --replay b=ROOT"):
        replay_labs([f"a={tmp_path / 'a'}"], base_labs)
    assert json.dumps([lab.name for lab in replay_labs([str(tmp_path / "a")], [])]) == '["a"]'
