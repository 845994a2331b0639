"""Per-photo captions: read beside the photos, kept through prepare (class noun inserted), trained on."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from idforge.curate.captions import caption_files, read_captions
from idforge.errors import DataError
from idforge.train.prepare import with_class_noun


def test_sidecars_and_captions_csv_are_read_and_a_stray_row_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    for rel in ("a/one.jpg", "a/two.jpg", "three.png"):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "a" / "one.txt").write_text("a man  on a\nbeach\n")  # whitespace is normalised
    (tmp_path / "a" / "two.txt").write_text("   \n")  # empty: no caption
    rels = ["a/one.jpg", "a/two.jpg", "three.png"]
    assert read_captions(tmp_path, rels) == {"a/one.jpg": "a man on a beach"}
    pd.DataFrame({"file": ["three.png", "a/one.jpg"], "caption": ["a woman reading", "a man in the snow"]}).to_csv(
        tmp_path / "captions.csv", index=False)
    # the CSV wins over a sidecar; a bare unique file name also matches
    assert read_captions(tmp_path, rels) == {"a/one.jpg": "a man in the snow", "three.png": "a woman reading"}
    # a photo's sidecar and the CSV are captions; an orphan .txt is an input (rejected with a reason, never dropped)
    assert caption_files(["captions.csv", "a/one.txt", "a/one.jpg", "notes.txt", "a/three.TXT"]) == {
        "captions.csv", "a/one.txt"}
    pd.DataFrame({"source": ["missing.jpg"], "caption": ["x"]}).to_csv(tmp_path / "captions.csv", index=False)
    with pytest.raises(DataError, match=r"names 1 photo\(s\) not in the input.*missing.jpg"):
        read_captions(tmp_path, rels)
    pd.DataFrame({"photo": ["three.png"], "text": ["x"]}).to_csv(tmp_path / "captions.csv", index=False)
    with pytest.raises(DataError, match="needs a 'caption' column"):
        read_captions(tmp_path, rels)


def test_the_class_noun_is_inserted_where_the_caption_lacks_it():
    assert with_class_noun("a man on a beach", "man") == "a man on a beach"
    assert with_class_noun("A Man, smiling", "man") == "A Man, smiling"
    assert with_class_noun("a woman on a beach", "man") == "a man, a woman on a beach"  # "man" is not in "woman"
    assert with_class_noun("smiling at the camera", "person") == "a person, smiling at the camera"
    assert with_class_noun("", "man") == with_class_noun(None, "man") == ""


def test_prepare_keeps_each_photos_caption_and_the_dataset_trains_on_it(curated_tiny_dataset, tiny_sd15_dir,
                                                                        tiny_clip_dir, tmp_path):
    from idforge.diffusion.text import tokenize
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.config import PrepareConfig
    from idforge.train.dataset import PreparedDataset
    from idforge.train.prepare import prepare_dataset

    ds = tmp_path / "ds"
    shutil.copytree(curated_tiny_dataset, ds)
    manifest = pd.read_parquet(ds / "manifest.parquet")
    accepted = manifest.index[manifest["status"] == "accepted"]
    manifest["caption"] = ""
    manifest.loc[accepted[0], "caption"] = "smiling in the snow"
    manifest.loc[accepted[1], "caption"] = "a person reading a book"
    manifest.to_parquet(ds / "manifest.parquet", index=False)
    index = prepare_dataset(ds, str(tiny_sd15_dir), tmp_path / "prep", PrepareConfig(flip=False),
                            clip_model=str(tiny_clip_dir))
    kinds = [c["kind"] for c in index.info["captions"]]
    assert kinds.count("image") == 2 and kinds.count("template") == 4  # one class noun x 4 templates
    prompts = {c["prompt"] for c in index.info["captions"] if c["kind"] == "image"}
    assert prompts == {"a person, smiling in the snow", "a person reading a book"}
    items = index.items.set_index("source")
    src0 = manifest.loc[accepted[0], "source"]
    row0 = int(items.loc[src0, "caption_row"])
    assert index.info["captions"][row0]["prompt"] == "a person, smiling in the snow"
    assert (index.items["caption_row"] == -1).sum() == len(index.items) - 2  # the rest: templates

    data = PreparedDataset(index.output_dir, seed=0)
    pipe = load_frozen_pipeline(tiny_sd15_dir)
    want = tokenize(pipe, ["a person, smiling in the snow"])[0][0]
    pos = int(index.items.index[index.items["source"] == src0][0])
    target = [i for i in range(len(data)) if int(data.targets[i]) == pos][0]
    for position in range(3):  # every draw of that photo uses its own caption
        assert (data[(target, position)]["input_ids"] == want).all()
