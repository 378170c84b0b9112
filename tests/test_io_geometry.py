"""Every output keeps the input's world geometry as nibabel and ITK read it; bad inputs get errors naming the file."""

import json
import os
import socket
import subprocess
import sys
import time
import warnings

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from noder_monai.data import load_sequence, load_series
from noder_monai.io import Geometry, check_output_dir, load_label_map, load_scan, parse_times, save_image
from noder_monai.utils import atomic_write, clean_stale_temporaries
from noder_monai.data.datalist import load_datalist


def itk_geometry(path):
    image = itk.imread(str(path))
    return (np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()),
            itk.array_from_matrix(image.GetDirection()))


def assert_same_geometry(output, reference, nibabel_too=True):
    """Output and input agree to 1e-5 through ITK and (for NIfTI inputs) through nibabel.

    ITK reads a 2D vector field stored ``(X, Y, 1, 1, 2)`` as a 2D image (its own projection of the plane): there
    only nibabel's reading is compared.
    """
    got_itk, want_itk = itk_geometry(output), itk_geometry(reference)
    if got_itk[0].shape == want_itk[0].shape:
        for got, want in zip(got_itk, want_itk):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    else:
        assert nibabel_too and nib.load(str(output)).header.get_intent()[0] == "vector"
    if nibabel_too:
        np.testing.assert_allclose(nib.load(str(output)).affine, nib.load(str(reference)).affine, atol=1e-5, rtol=0)
        assert nib.load(str(output)).shape[:3] == nib.load(str(reference)).shape[:3]


def oblique_lps(spacing=(1.1, 0.9, 3.0), origin=(12.5, -20.25, 33.0)):
    """An oblique, anisotropic grid stored LPS-like (first two axes flipped): det < 0 voxel order."""
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ rx @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def write_qs(path, data, qform, sform, qcode=1, scode=2):
    image = nib.Nifti1Image(data.astype(np.float32), None)
    image.header.set_qform(qform, qcode)
    image.header.set_sform(sform, scode)
    nib.save(image, str(path))
    return str(path)


def translation(offset, spacing=2.0):
    matrix = np.diag([spacing] * 3 + [1.0])
    matrix[:3, 3] = offset
    return matrix


@pytest.mark.parametrize("reader", ["nibabel", "itk"])
def test_disagreeing_qform_sform_warn_and_are_both_kept(tmp_path, reader):
    source = write_qs(tmp_path / "qs.nii.gz", np.random.rand(16, 16, 16), translation(-8), translation((-18, -3, 7)))
    with pytest.warns(UserWarning, match=r"qs.nii.gz': qform \(code 1.*sform \(code 2.*disagree.*This run used the "
                      + ("sform" if reader == "nibabel" else "qform")):
        data, geometry = load_scan(source, reader)
    for name, array in {"image": data, "field": torch.rand(3, 16, 16, 16), "labels": data.round()}.items():
        out = save_image(array, geometry, tmp_path / f"{name}.nii.gz")
        header = nib.load(out).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2)
        assert_same_geometry(out, source)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("reader", ["nibabel", "itk", None])
def test_oblique_anisotropic_lps_geometry_kept(tmp_path, reader, suffix):
    matrix = oblique_lps()
    source = write_qs(tmp_path / f"scan{suffix}", np.random.rand(10, 12, 8), matrix, matrix, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # forms agree: no warning
        data, geometry = load_scan(source, reader)
    out = save_image(data, geometry, tmp_path / f"out{suffix}")
    assert_same_geometry(out, source)
    np.testing.assert_allclose(geometry.affine, matrix, atol=1e-5)


@pytest.mark.parametrize("shape,axis", [((12, 1, 10), 1), ((1, 12, 10), 0), ((12, 10, 1), 2)])
@pytest.mark.parametrize("reader", ["nibabel", "itk"])
def test_singleton_axis_is_2d_and_restored(tmp_path, shape, axis, reader):
    matrix = oblique_lps(spacing=(0.8, 1.2, 3.0))
    source = write_qs(tmp_path / "slice.nii.gz", np.random.rand(*shape), matrix, matrix, 1, 1)
    data, geometry = load_scan(source, reader)
    assert data.shape == (1,) + tuple(s for s in shape if s != 1)
    assert geometry.squeezed_axis == axis and geometry.file_shape == shape
    # voxel volume includes the stored thickness of the singleton axis (0.8 * 1.2 * 3.0 mm^3)
    assert geometry.voxel_volume_mm3 == pytest.approx(2.88, abs=1e-6)
    for name, array in {"image": data, "field": torch.rand(2, *data.shape[1:])}.items():
        out = save_image(array, geometry, tmp_path / f"{name}.nii.gz")
        assert nib.load(out).shape[:3] == shape
        assert_same_geometry(out, source)
    back, _ = load_scan(tmp_path / "image.nii.gz", reader)
    assert torch.equal(back, data)


def test_two_singleton_axes_are_refused(tmp_path):
    source = write_qs(tmp_path / "line.nii.gz", np.random.rand(12, 1, 1), np.eye(4), np.eye(4), 1, 1)
    with pytest.raises(ValueError, match=r"line.nii.gz' has spatial size \(12, 1, 1\): 2 axes of length 1"):
        load_scan(source)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_give_nifti_outputs_at_the_same_place(tmp_path, suffix):
    array = np.random.rand(8, 9, 10).astype(np.float32)  # numpy (z, y, x)
    image = itk.image_from_array(array)
    image.SetOrigin([4.5, -3.25, 10.0])
    image.SetSpacing([0.7, 1.3, 2.5])
    angle = 0.25
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    image.SetDirection(itk.matrix_from_array(direction))
    source = str(tmp_path / f"scan{suffix}")
    itk.imwrite(image, source)
    data, geometry = load_scan(source)
    out = save_image(data, geometry, tmp_path / "out.nii.gz")
    assert_same_geometry(out, source, nibabel_too=False)
    np.testing.assert_allclose(nib.load(out).affine, geometry.affine, atol=1e-5)


def test_geometry_survives_plain_serialisation(tmp_path):
    source = write_qs(tmp_path / "qs.nii.gz", np.random.rand(6, 1, 5), translation(-8), translation((-18, -3, 7)))
    with pytest.warns(UserWarning):
        data, geometry = load_scan(source)
    restored = Geometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert_same_geometry(save_image(data, restored, tmp_path / "out.nii.gz"), source)
    with pytest.raises(ValueError, match=r"geometry is missing field 'file_shape'"):
        Geometry.from_dict({"affine": np.eye(4).tolist()})


def test_plain_affine_output_is_read_alike_by_nibabel_and_itk(tmp_path):
    matrix = oblique_lps()
    out = save_image(torch.rand(1, 6, 5, 4), torch.as_tensor(matrix), tmp_path / "plain.nii.gz")
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    origin, spacing, direction = itk_geometry(out)
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(origin, lps @ matrix[:3, 3], atol=1e-5)
    np.testing.assert_allclose(direction @ np.diag(spacing), lps @ matrix[:3, :3], atol=1e-5)


def test_4d_series_is_named_and_readable_as_a_series(tmp_path):
    frames = np.random.rand(8, 8, 8, 3).astype(np.float32)
    series = str(tmp_path / "cine.nii.gz")
    nib.save(nib.Nifti1Image(frames, np.eye(4)), series)
    other = save_image(torch.rand(1, 8, 8, 8), torch.eye(4, dtype=torch.float64), tmp_path / "t0.nii.gz")
    with pytest.raises(ValueError, match=r"scan '.*cine.nii.gz' has 3 time points \(a 4D series\).*load_series"):
        load_sequence([other, series], [0.0, 1.0], subject="s")
    sequence = load_series(series, [0.0, 0.3, 0.6], subject="s")
    assert sequence.images.shape == (3, 1, 8, 8, 8)
    assert torch.equal(sequence.images[2, 0], torch.as_tensor(frames[..., 2]))
    with pytest.raises(ValueError, match=r"series '.*cine.nii.gz' has 3 frames but 2 times"):
        load_series(series, [0.0, 1.0])


def test_folder_and_one_hot_labels_are_named(tmp_path):
    folder = tmp_path / "dicom_series"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"image '.*dicom_series' is a folder, not an image file.*dcm2niix"):
        load_scan(folder)
    scan = save_image(torch.rand(1, 6, 6, 6), torch.eye(4, dtype=torch.float64), tmp_path / "a.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"subjects": [{"id": "s", "scans": [{"image": "a.nii.gz", "time": 0},
                                                                      {"image": "dicom_series", "time": 1}]}]}))
    with pytest.raises(ValueError, match=r"subject 's': field 'scans'\[1\].image: '.*dicom_series' is a folder"):
        load_datalist(datalist)
    one_hot = np.zeros((6, 6, 6, 4), dtype=np.float32)
    one_hot[..., 0] = 1
    path = str(tmp_path / "labels_onehot.nii.gz")
    nib.save(nib.Nifti1Image(one_hot, np.eye(4)), path)
    with pytest.raises(ValueError, match=r"label map '.*labels_onehot.nii.gz' has 4 channels.*one-hot"):
        load_label_map(path)
    fractional = save_image(torch.rand(1, 6, 6, 6), torch.eye(4, dtype=torch.float64), tmp_path / "soft.nii.gz")
    with pytest.raises(ValueError, match=r"label map '.*soft.nii.gz' has non-integer"):
        load_label_map(fractional)
    assert scan.endswith("a.nii.gz")


def test_check_output_dir(tmp_path):
    created = check_output_dir(tmp_path / "new" / "runs")
    assert os.path.isdir(created) and os.listdir(created) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir '.*afile' exists and is not a folder"):
        check_output_dir(afile)
    with pytest.raises(ValueError, match=r"output_dir '.*afile/sub' cannot be created"):
        check_output_dir(afile / "sub")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(ValueError, match=r"output_dir '.*locked' is not writable"):
                check_output_dir(locked)
        finally:
            locked.chmod(0o755)


def test_every_output_gets_one_mode(tmp_path):
    old = os.umask(0o022)
    try:
        nifti = save_image(torch.rand(1, 4, 4, 4), torch.eye(4, dtype=torch.float64), tmp_path / "a.nii.gz")
        text = atomic_write(tmp_path / "b.json", b"{}\n")
        with_callable = atomic_write(tmp_path / "c.bin", lambda p: open(p, "wb").write(b"1"))
    finally:
        os.umask(old)
    assert {oct(os.stat(p).st_mode & 0o777) for p in (nifti, text, with_callable)} == {"0o644"}
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.json", "c.bin"]


def test_stale_temporaries_of_our_own_are_removed(tmp_path):
    host = "".join(c if c.isalnum() or c == "_" else "_" for c in socket.gethostname())[:32]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    sub = tmp_path / "sub-01"
    sub.mkdir()
    stale = sub / f".model.pt.noder-{host}-{dead_pid}-0123abcd.tmp"
    live = sub / f".image.nii.gz.noder-{host}-{os.getpid()}-0123abcd.tmp"
    legacy_old = sub / ".tmp-0123456789abcdef0123456789abcdef-image.nii.gz"
    legacy_new = sub / ".metrics.json.ab_cd123.tmp"
    user = sub / "notes.tmp"
    for path in (stale, live, legacy_old, legacy_new, user):
        path.write_bytes(b"")
    past = time.time() - 7200
    os.utime(legacy_old, (past, past))
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([str(stale), str(legacy_old)])
    assert sorted(os.listdir(sub)) == sorted([live.name, legacy_new.name, user.name])


@pytest.mark.parametrize("text,expected", [
    ("[1.0, 2.5]", [1.0, 2.5]), ("[1.0 2.0]", [1.0, 2.0]), ("1, 2,3", [1.0, 2.0, 3.0]), ("2", [2.0]),
    (2, [2.0]), ([0, 1.5], [0.0, 1.5]), (torch.tensor([1.0, 2.0]), [1.0, 2.0]),
])
def test_parse_times_accepts(text, expected):
    assert parse_times(text) == expected


@pytest.mark.parametrize("value,message", [
    ("[abc]", r"--times: 'abc' in '\[abc\]' is not a number; expected a number or a list of numbers"),
    ("[]", r"--times: '\[\]' holds no time"),
    (["1.0"], r"--times\[0\] is the string '1.0', not a number"),
    ([1.0, float("inf")], r"--times must be finite, got inf at index 1"),
    ([True], r"--times\[0\] is True \(bool\), not a number"),
])
def test_parse_times_errors_name_the_entry(value, message):
    with pytest.raises(ValueError, match=message):
        parse_times(value, name="--times")


def tilted_plane(origin=(7.5, -12.0, -41.0), spacing=(0.7, 1.3, 2.5)):
    """A slice plane tilted about x (its in-plane axes have z components), 2.5 mm thick, through z = -41 mm."""
    tilt = 0.35
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


@pytest.mark.parametrize("reader", [None, "itk", "nibabel"])
def test_geometry_of_2d_slices_is_exact_through_every_reader_and_path(tmp_path, reader):
    matrix = tilted_plane()
    plane = np.random.default_rng(3).random((14, 11)).astype(np.float32)
    files = {"2d": nib.Nifti1Image(plane, matrix), "singleton": nib.Nifti1Image(plane[:, :, None], matrix)}
    paths = {}
    for name, image in files.items():
        image.header.set_qform(matrix, 1)
        image.header.set_sform(matrix, 1)
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(image, paths[name])
    for name, path in paths.items():
        data, geometry = load_scan(path, reader)
        assert data.shape == (1, 14, 11)
        np.testing.assert_allclose(geometry.affine, matrix, atol=1e-5)  # slice position and thickness kept
        np.testing.assert_allclose(geometry.itk_affine, matrix, atol=1e-5)
        assert geometry.voxel_volume_mm3 == pytest.approx(0.7 * 1.3 * 2.5, rel=1e-6)
        sequence = load_sequence([path, path], [0.0, 1.0], subject="slice", reader=reader)  # the Python path
        np.testing.assert_allclose(sequence.affine.numpy(), matrix, atol=1e-5)
        out = save_image(torch.rand(1, 14, 11), sequence.geometry, tmp_path / f"out_{name}.nii.gz")
        assert nib.load(out).shape == nib.load(path).shape
        assert_same_geometry(out, path)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
@pytest.mark.parametrize("reader", [None, "itk"])
def test_geometry_of_itk_formats_is_exact_in_2d_and_3d(tmp_path, suffix, reader):
    for shape in ((9, 1, 12), (9, 7, 12)):  # numpy (z, y, x): a single row in y is a 2D image
        image = itk.image_from_array(np.random.default_rng(0).random(shape).astype(np.float32))
        image.SetOrigin([-3.5, 20.25, -41.0])
        image.SetSpacing([0.6, 2.5, 1.4])
        direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        image.SetDirection(itk.matrix_from_array(direction))
        source = str(tmp_path / f"scan{shape[1]}{suffix}")
        itk.imwrite(image, source)
        data, geometry = load_scan(source, reader)
        expected = np.eye(4)
        expected[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag([0.6, 2.5, 1.4])
        expected[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array([-3.5, 20.25, -41.0])
        np.testing.assert_allclose(geometry.itk_affine[:3, 3], expected[:3, 3], atol=1e-5)
        assert geometry.voxel_volume_mm3 == pytest.approx(0.6 * 2.5 * 1.4, rel=1e-6)
        out = save_image(data, geometry, tmp_path / f"out{shape[1]}.nii.gz")
        assert_same_geometry(out, source, nibabel_too=False)
