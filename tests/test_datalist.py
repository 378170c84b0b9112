import copy
import json
import os

import pytest
import torch

from noder_monai.data.datalist import SubjectEntry, load_datalist
from noder_monai.io.image import save_image


@pytest.fixture()
def dataset(tmp_path):
    """A folder with two subjects' scans and a valid datalist document (not yet written)."""
    for subject in ("s1", "s2"):
        for name in ("a", "b", "c", "held", "label"):
            save_image(torch.rand(1, 4, 4, 4), torch.eye(4), tmp_path / subject / f"{name}.nii.gz")
    document = {
        "description": "extra top-level keys are ignored",
        "subjects": [
            {
                "id": "s1",
                "scans": [{"image": "s1/a.nii.gz", "time": 0}, {"image": "s1/b.nii.gz", "time": 1.5},
                          {"image": "s1/c.nii.gz", "time": 3.0}],
                "label": "s1/label.nii.gz",
                "heldout": [{"image": "s1/held.nii.gz", "time": 4.0}],
                "predict_times": [2, 5.5],
            },
            {"id": "s2", "scans": [{"image": "s2/a.nii.gz", "time": 0.0}, {"image": "s2/b.nii.gz", "time": 0.25}]},
        ],
    }
    return tmp_path, document


def _write(folder, document, name="datalist.json"):
    path = folder / name
    path.write_text(json.dumps(document))
    return path


def test_valid_datalist_resolves_paths(dataset):
    folder, document = dataset
    entries = load_datalist(_write(folder, document))
    assert [entry.id for entry in entries] == ["s1", "s2"]
    first = entries[0]
    assert isinstance(first, SubjectEntry)
    assert first.scans == [(str(folder / "s1" / f"{name}.nii.gz"), time) for name, time in (("a", 0.0), ("b", 1.5),
                                                                                             ("c", 3.0))]
    assert all(isinstance(time, float) for _, time in first.scans)
    assert first.times == [0.0, 1.5, 3.0]
    assert first.label == str(folder / "s1" / "label.nii.gz")
    assert first.heldout == [(str(folder / "s1" / "held.nii.gz"), 4.0)]
    assert first.predict_times == [2.0, 5.5]
    second = entries[1]
    assert (second.label, second.heldout, second.predict_times) == (None, [], [])
    sequence = second.load()
    assert sequence.images.shape == (2, 1, 4, 4, 4)
    assert sequence.subject == "s2"
    assert sequence.times.tolist() == [0.0, 0.25]


def test_dataset_dir_overrides_the_datalist_folder(dataset):
    folder, document = dataset
    os.makedirs(folder / "lists")
    path = _write(folder / "lists", document)
    with pytest.raises(FileNotFoundError, match=r"subject 's1': field 'scans'\[0\].image: file not found"):
        load_datalist(path)
    entries = load_datalist(path, dataset_dir=folder)
    assert entries[1].scans[1] == (str(folder / "s2" / "b.nii.gz"), 0.25)


def _broken(document, edit):
    copied = copy.deepcopy(document)
    edit(copied["subjects"][0])
    return copied


BAD_SUBJECTS = [
    (lambda s: s.pop("id"), ValueError, r"subject #0: missing field 'id'"),
    (lambda s: s.update(id=""), ValueError, r"subject #0: field 'id' must be a non-empty string, got ''"),
    (lambda s: s.pop("scans"), ValueError, r"subject 's1': field 'scans' is missing"),
    (lambda s: s.update(scans=s["scans"][:1]), ValueError,
     r"subject 's1': field 'scans' needs at least 2 scans, got 1"),
    (lambda s: s["scans"][1].update(time="1.5"), ValueError,
     r"subject 's1': field 'scans'\[1\].time must be a finite number, got '1.5'"),
    (lambda s: s["scans"][1].update(time=float("nan")), ValueError,
     r"subject 's1': field 'scans'\[1\].time must be a finite number, got nan"),
    (lambda s: s["scans"][1].update(time=True), ValueError,
     r"subject 's1': field 'scans'\[1\].time must be a finite number, got True"),
    (lambda s: s["scans"][1].pop("time"), ValueError,
     r"subject 's1': field 'scans'\[1\] must be an object with 'image' and 'time'"),
    (lambda s: s["scans"][2].update(time=1.5), ValueError,
     r"subject 's1': field 'scans' times must be strictly increasing, duplicate times 1.5 and 1.5 \(entries 1 and 2\)"),
    (lambda s: s["scans"][2].update(time=1.0), ValueError,
     r"subject 's1': field 'scans' times must be strictly increasing, unsorted times 1.5 and 1"),
    (lambda s: s["scans"][0].update(image="s1/nope.nii.gz"), FileNotFoundError,
     r"subject 's1': field 'scans'\[0\].image: file not found: '.*nope.nii.gz'"),
    (lambda s: s.update(label="s1/nolabel.nii.gz"), FileNotFoundError,
     r"subject 's1': field 'label': file not found: '.*nolabel.nii.gz'"),
    (lambda s: s["heldout"][0].update(image="s1/x.nii.gz"), FileNotFoundError,
     r"subject 's1': field 'heldout'\[0\].image: file not found"),
    (lambda s: s["heldout"][0].update(time=None), ValueError,
     r"subject 's1': field 'heldout'\[0\].time must be a finite number, got None"),
    (lambda s: s.update(predict_times=[1, "soon"]), ValueError,
     r"subject 's1': field 'predict_times'\[1\] must be a finite number, got 'soon'"),
    (lambda s: s.update(predict_times=3.0), ValueError,
     r"subject 's1': field 'predict_times' must be a list of numbers, got 3.0"),
    (lambda s: s.update(heldouts=[]), ValueError, r"subject 's1': unknown field\(s\) \['heldouts'\]"),
    (lambda s: s.update(scans={"image": "s1/a.nii.gz"}), ValueError, r"subject 's1': field 'scans' must be a list"),
]


@pytest.mark.parametrize("edit, error, message", BAD_SUBJECTS)
def test_bad_subject_errors_name_subject_and_field(dataset, edit, error, message):
    folder, document = dataset
    with pytest.raises(error, match=message):
        load_datalist(_write(folder, _broken(document, edit)))


def test_duplicate_id_and_bad_files(dataset):
    folder, document = dataset
    document["subjects"][1]["id"] = "s1"
    with pytest.raises(ValueError, match=r"subject 's1': field 'id' is used by more than one subject"):
        load_datalist(_write(folder, document))
    with pytest.raises(FileNotFoundError, match=r"datalist file not found: '.*absent.json'"):
        load_datalist(folder / "absent.json")
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"datalist '.*bad.json' is not valid JSON"):
        load_datalist(folder / "bad.json")
    with pytest.raises(ValueError, match=r"datalist '.*nosubjects.json': field 'subjects' \(a list of subjects\) is "
                       r"missing"):
        load_datalist(_write(folder, {"training": []}, "nosubjects.json"))
    with pytest.raises(ValueError, match=r"datalist '.*empty.json': field 'subjects' is empty"):
        load_datalist(_write(folder, {"subjects": []}, "empty.json"))
