"""Fit and predict: accuracy on tiny synthetic sequences, the one-file round trip, and errors for bad input."""

import math

import pytest
import torch

from noder_monai.baselines import linear_interpolation, nearest_scan
from noder_monai.data import SubjectSequence, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.model import FittedSubject
from noder_monai.metrics import nrmse

SMALL_NETWORK = {"smoothing_kernel": 7}
SMALL_CONFIG = {"ncc_kernel_size": 9, "levels": (2, 1), "level_fractions": (0.6, 0.4), "source": "baseline"}  # noiseless scans
HELDOUT = [2, 5, 9]  # two frames between observed ones and one after the last


def _split(synthetic):
    observed = [i for i in range(len(synthetic.times)) if i not in HELDOUT]
    sequence = SubjectSequence.from_tensors(synthetic.images[observed], synthetic.times[observed], subject="tiny")
    return sequence, observed


def _fit_and_score(spatial_dims, size, epochs):
    synthetic = synthetic_sequence(spatial_dims=spatial_dims, size=size, kind="cardiac", seed=3, amplitude=2.0)
    sequence, observed = _split(synthetic)
    fitted = fit_sequence(sequence, FitConfig(epochs=epochs, **SMALL_CONFIG), network=SMALL_NETWORK, progress=False)
    query = synthetic.times[HELDOUT]
    truth = synthetic.clean[HELDOUT]
    scores = {
        "noder": nrmse(fitted.predict(query).images, truth),
        "nearest": nrmse(nearest_scan(sequence.images, sequence.times, query), truth),
        "linear": nrmse(linear_interpolation(sequence.images, sequence.times, query), truth),
    }
    return fitted, synthetic, scores


@pytest.fixture(scope="module")
def fitted_2d():
    return _fit_and_score(2, 32, 300)


def test_2d_fit_beats_nearest_scan_and_linear_interpolation(fitted_2d):
    _, _, scores = fitted_2d
    assert scores["noder"].mean() < 0.7 * scores["linear"].mean()
    assert scores["noder"].mean() < 0.7 * scores["nearest"].mean()
    assert torch.all(scores["noder"][:2] < scores["nearest"][:2])


def test_3d_fit_beats_nearest_scan_and_linear_interpolation():
    _, _, scores = _fit_and_score(3, 24, 400)
    assert scores["noder"].mean() < 0.7 * scores["linear"].mean()
    assert scores["noder"].mean() < 0.7 * scores["nearest"].mean()
    assert torch.all(scores["noder"] < scores["nearest"])


def test_fit_is_repeatable_for_a_seed_and_records_its_history(fitted_2d):
    fitted, synthetic, _ = fitted_2d
    sequence, _ = _split(synthetic)
    again = fit_sequence(sequence, FitConfig(epochs=300, **SMALL_CONFIG), network=SMALL_NETWORK, progress=False)
    assert torch.equal(again.predict([0.45]).images, fitted.predict([0.45]).images)
    assert len(fitted.history) == 300
    assert [record["level"] for record in fitted.history[179:181]] == [2, 1]
    assert fitted.history[-1]["total"] < fitted.history[0]["total"]


def test_prediction_outputs_are_consistent(fitted_2d):
    fitted, synthetic, _ = fitted_2d
    prediction = fitted.predict([0.0, 0.45, 1.3, -0.2], labels=synthetic.label)
    assert prediction.images.shape == (4, 1, 32, 32)
    assert prediction.ddfs.shape == (4, 2, 32, 32)
    assert prediction.jacobians.shape == (4, 1, 32, 32)
    assert torch.count_nonzero(prediction.ddfs[0]) == 0
    assert torch.allclose(prediction.images[0], synthetic.images[0], atol=1e-5)
    assert torch.equal(prediction.labels[0, 0].long(), synthetic.label[0].long())
    assert set(prediction.labels.unique().tolist()) <= set(synthetic.label.unique().tolist())
    assert torch.allclose(prediction.jacobians[0], torch.ones(1, 32, 32))
    assert prediction.images.dtype == torch.float32


def test_fitted_labels_follow_the_true_labels(fitted_2d):
    fitted, synthetic, _ = fitted_2d
    carried = fitted.predict(synthetic.times[[5]], labels=synthetic.label).labels[0, 0].long()
    true = synthetic.label_sequence[5, 0].long()
    static = synthetic.label[0].long()
    assert (carried == true).float().mean() > (static == true).float().mean()


def test_save_load_round_trip_gives_identical_predictions(fitted_2d, tmp_path):
    fitted, _, _ = fitted_2d
    path = fitted.save(tmp_path / "subject.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["subject.pt"]
    loaded = FittedSubject.load(path)
    times = [-0.3, 0.25, 0.45, 1.5]
    assert torch.equal(loaded.predict(times).images, fitted.predict(times).images)
    assert torch.equal(loaded.affine, fitted.affine)
    assert loaded.history == fitted.history
    raw = torch.load(path, weights_only=True)
    assert raw["time_scale"] == pytest.approx(float(fitted.times[-1] - fitted.times[0]))
    assert raw["spatial_size"] == [32, 32]


def test_loading_a_checkpoint_recorded_for_another_size_names_the_file(fitted_2d, tmp_path):
    fitted, _, _ = fitted_2d
    state = fitted.state()
    state["network"]["spatial_size"] = [48, 48]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt.*48, 48"):
        FittedSubject.load(tmp_path / "other.pt")


def test_prediction_rejects_labels_of_another_size_or_dimensionality(fitted_2d):
    fitted, _, _ = fitted_2d
    with pytest.raises(ValueError, match=r"labels has spatial size \(16, 16\).*fitted to 2D images of size \(32, 32\)"):
        fitted.predict([0.5], labels=torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="labels has spatial size"):
        fitted.predict([0.5], labels=torch.zeros(1, 32, 32, 32))


def test_loading_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        FittedSubject.load(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt.*not a readable torch file"):
        FittedSubject.load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt.*is not a 'noder-monai/fitted-subject' file"):
        FittedSubject.load(tmp_path / "foreign.pt")


def test_prediction_rejects_non_finite_or_empty_times(fitted_2d):
    fitted, _, _ = fitted_2d
    with pytest.raises(ValueError, match="times must be finite"):
        fitted.predict([math.nan])
    with pytest.raises(ValueError, match="at least one time point"):
        fitted.predict([])


def test_fit_config_rejects_bad_values():
    with pytest.raises(ValueError, match="levels must be"):
        FitConfig(levels=(3,), level_fractions=(1.0,))
    with pytest.raises(ValueError, match="level_fractions must sum to 1"):
        FitConfig(level_fractions=(0.5, 0.3, 0.3))
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        FitConfig(epochs=0)
    for bad in (-0.5, float("nan"), "wide"):
        with pytest.raises(ValueError, match="image_smoothing_sigma must be a finite number >= 0"):
            FitConfig(image_smoothing_sigma=bad)
    assert FitConfig(epochs=10).epochs_per_level() == [6, 2, 2]
    assert FitConfig(epochs=300).epochs_per_level() == [180, 60, 60]


def test_a_known_translation_is_reproduced():
    """A blob moving 4 voxels along axis 0 at constant speed: the fitted field in the blob matches the shift."""
    size = 32
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 2, indexing="ij"))
    times = torch.tensor([0.0, 0.5, 1.0])

    def blob(shift):
        centre = torch.tensor([14.0 + shift, 16.0]).reshape(2, 1, 1)
        return torch.exp(-((grid - centre) ** 2).sum(0) / (2 * 4.0**2))[None]

    images = torch.stack([blob(4.0 * float(t)) for t in times])
    sequence = SubjectSequence.from_tensors(images, times)
    fitted = fit_sequence(sequence, FitConfig(epochs=200, **SMALL_CONFIG), network=SMALL_NETWORK, progress=False)
    ddf = fitted.predict([0.25, 0.75]).ddfs
    inside = blob(0.0)[0] > 0.5
    # pull-back convention: out(x) = I0(x + ddf(x)), so a blob moved by +s needs ddf = -s along axis 0
    assert ddf[0, 0][inside].mean().item() == pytest.approx(-1.0, abs=0.2)
    assert ddf[1, 0][inside].mean().item() == pytest.approx(-3.0, abs=0.3)
    assert ddf[:, 1][:, inside].abs().mean().item() < 0.2


@pytest.mark.parametrize("groups", [1, 2])
def test_early_stopping_ends_the_last_level_after_patience_epochs_without_improvement(groups):
    synthetic = synthetic_sequence(spatial_dims=2, size=16, kind="cardiac", seed=0)
    sequence = SubjectSequence.from_tensors(synthetic.images[:4], synthetic.times[:4])
    config = FitConfig(epochs=50, levels=(2, 1), level_fractions=(0.2, 0.8), patience=3, min_improvement=1.0,
                       finest_time_groups=groups)
    fitted = fit_sequence(sequence, config, network=SMALL_NETWORK, progress=False)
    # 10 epochs at level 2 (never stopped early), then the first level-1 epoch of each group of times sets that
    # group's best loss and no later epoch improves it by 100%, so three stale epochs end the fit
    assert [record["level"] for record in fitted.history] == [2] * 10 + [1] * (3 + groups)


def test_image_smoothing_shrinks_the_spurious_shift_that_noisy_scans_favour():
    """Two noisy scans of one anatomy, no motion: the shift of one that best matches the other (local NCC) is 0.2
    voxel off, because linear interpolation at a sub-voxel shift averages the noise; after level_image's smoothing
    it is closer to zero for every seed. Smoothing keeps the mean of the image and the grid of the level."""
    from monai.networks.blocks import Warp

    from noder_monai.data import demo_volume
    from noder_monai.engines.levels import downsample_image, level_image
    from noder_monai.losses import LocalNCCLoss

    clean = demo_volume(48)[0].reshape(48, 48, 48)[:, :, 24].float()
    clean = (clean - clean.min()) / (clean.max() - clean.min())
    loss, warp = LocalNCCLoss(spatial_dims=2, kernel_size=9), Warp("bilinear", "border")
    shifts = [k / 20 for k in range(-10, 11)]

    def best_shift(moving, fixed):
        values = []
        for shift in shifts:
            ddf = torch.zeros(1, 2, *clean.shape)
            ddf[:, 0] = shift
            values.append(float(loss(warp(moving, ddf), fixed)))
        return abs(shifts[min(range(len(shifts)), key=values.__getitem__)])

    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        a, b = (clean + 0.1 * torch.randn(clean.shape, generator=generator) for _ in range(2))
        raw = best_shift(a[None, None], b[None, None])
        smoothed = best_shift(level_image(a[None, None], 1, 0.5), level_image(b[None, None], 1, 0.5))
        assert raw >= 0.15 and smoothed < raw, (seed, raw, smoothed)
    image = torch.rand(1, 1, 17, 16)
    assert torch.equal(level_image(image, 2, 0.0), downsample_image(image, 2))
    assert level_image(image, 2, 1.0).shape == (1, 1, 9, 8)
    assert math.isclose(float(level_image(torch.full((1, 1, 16, 16), 3.0), 1, 1.0).mean()), 3.0, rel_tol=1e-4)


def test_full_resolution_epochs_alternate_between_interleaved_groups_of_times():
    """finest_time_groups=2 with five target scans: the level-1 epochs fit times 1, 3, 5 then 2, 4, in turn."""
    from ignite.engine import Events

    from noder_monai.engines import NODERTrainer
    from noder_monai.losses import NODERLoss
    from noder_monai.networks import NODER

    synthetic = synthetic_sequence(spatial_dims=2, size=16, kind="cardiac", seed=0, times=[0, 1, 2, 3, 4, 5])
    item = {"image": synthetic.images[:, 0][None], "time": synthetic.times[None]}
    network = NODER((16, 16), smoothing_kernel=3)
    trainer = NODERTrainer("cpu", 4, [item], network, torch.optim.Adam(network.parameters()),
                           NODERLoss(spatial_dims=2, ncc_kernel_size=5), finest_time_groups=2)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(engine.state.output[0]["label"].shape[0]))
    trainer.run()
    assert seen == [3, 2, 3, 2]
    assert trainer._at_level(1, item, 0)[3].tolist() == pytest.approx([0.2, 0.6, 1.0])
    assert trainer._at_level(1, item, 1)[3].tolist() == pytest.approx([0.4, 0.8])
    assert trainer._at_level(2, item)[3].numel() == 5  # coarser levels fit every time in every epoch
    with pytest.raises(ValueError, match="finest_time_groups must be an integer >= 1, got 0"):
        FitConfig(finest_time_groups=0)


def test_an_interrupted_fit_writes_no_model_file_where_monais_checkpoint_saver_writes_one(tmp_path):
    """Why FittedSubjectSaver is not MONAI's CheckpointSaver: with save_final, CheckpointSaver also writes its final
    file when the run raises (a fit stopped at epoch 2 of 3 would leave a model.pt like a finished one, which
    --skip_existing then keeps); FittedSubjectSaver writes only at completion. (CheckpointSaver also writes in place,
    DiskSaver(atomic=False), and saves state_dicts, not the subject's scans, times, mapping and template.)"""
    from ignite.engine import Events
    from monai.data import DataLoader
    from monai.handlers import CheckpointSaver

    from noder_monai.engines import FittedSubjectSaver, NODERTrainer, init_network
    from noder_monai.losses import NODERLoss
    from noder_monai.networks import NODER
    from noder_monai.transforms import IntensityMappingd, sequence_item

    synthetic = synthetic_sequence(spatial_dims=2, size=16, times=(0.0, 0.5, 1.0), seed=0)
    item = IntensityMappingd(keys="image")(sequence_item(SubjectSequence.from_tensors(synthetic.images, synthetic.times)))

    def interrupted_fit(make_saver):
        network = init_network(NODER((16, 16), **SMALL_NETWORK), pretrained=None)
        trainer = NODERTrainer(device="cpu", max_epochs=3, train_data_loader=DataLoader([item], batch_size=1),
                               network=network, optimizer=torch.optim.Adam(network.parameters(), 1e-3),
                               loss_function=NODERLoss(spatial_dims=2, ncc_kernel_size=5),
                               train_handlers=[make_saver(network)])

        @trainer.on(Events.EPOCH_COMPLETED(once=2))
        def stop(engine):
            raise RuntimeError("stopped at epoch 2")

        with pytest.raises(RuntimeError, match="stopped at epoch 2"):
            trainer.run()

    interrupted_fit(lambda network: CheckpointSaver(str(tmp_path / "monai"), {"network": network}, save_final=True,
                                                    final_filename="model.pt"))
    assert (tmp_path / "monai" / "model.pt").is_file()
    interrupted_fit(lambda network: FittedSubjectSaver(tmp_path / "ours" / "model.pt", [item]))
    assert not (tmp_path / "ours").exists()


def test_similarity_box_scores_about_the_budget_with_whole_windows_and_covers_every_voxel():
    from noder_monai.engines.levels import similarity_box

    assert similarity_box((64, 64, 64), 64**3, 10) is None  # a 64^3 grid is scored whole by default
    assert similarity_box((96, 96, 96), 64**3, 10) is None  # the widened box would hold more than half of it
    assert similarity_box((40, 40), None, 2) is None
    size, radius = (144, 176, 144), 10
    torch.manual_seed(0)
    covered = [torch.zeros(n, dtype=torch.bool) for n in size]
    for _ in range(60):
        region, scored = similarity_box(size, 64**3, radius)
        inner = [len(range(*s.indices(r.stop - r.start))) for r, s in zip(region, scored)]
        assert math.prod(inner) <= 64**3 * 1.01
        for axis, (r, s, n) in enumerate(zip(region, scored, size)):
            assert 0 <= r.start < r.stop <= n
            assert r.start == max(0, r.start + s.start - radius)  # every scored window inside the box, or the
            assert r.stop == min(n, r.start + s.stop + radius)  # grid's own edge
            covered[axis][r.start + s.start:r.start + s.stop] = True
    assert all(bool(c.all()) for c in covered)
    torch.manual_seed(1)
    first = similarity_box(size, 64**3, radius)
    torch.manual_seed(1)
    assert similarity_box(size, 64**3, radius) == first  # drawn from the seeded global generator


def test_a_fit_that_scores_random_boxes_runs_and_scores_whole_small_grids_as_before():
    synthetic = synthetic_sequence(spatial_dims=3, size=16, kind="cardiac", seed=0, times=[0, 1, 2, 3])
    sequence = SubjectSequence.from_tensors(synthetic.images, synthetic.times, subject="box")
    config = {"epochs": 6, "levels": (2, 1), "level_fractions": (0.5, 0.5), "ncc_kernel_size": 5, "source": "baseline"}
    default = fit_sequence(sequence, FitConfig(**config), network=SMALL_NETWORK, progress=False)
    whole = fit_sequence(sequence, FitConfig(**config, similarity_voxels=None), network=SMALL_NETWORK, progress=False)
    assert [r["total"] for r in default.history] == [r["total"] for r in whole.history]
    boxed = fit_sequence(sequence, FitConfig(**config, similarity_voxels=64), network=SMALL_NETWORK, progress=False)
    assert all(math.isfinite(r["total"]) for r in boxed.history)
    assert [r["smoothness"] for r in boxed.history[:1]] == [r["smoothness"] for r in default.history[:1]]
    assert boxed.history[3]["similarity"] != default.history[3]["similarity"]
    with pytest.raises(ValueError, match="similarity_voxels must be None or an integer >= 1, got 0"):
        FitConfig(similarity_voxels=0)


def test_subject_collate_adds_the_batch_axis_as_a_view_and_takes_one_subject():
    from noder_monai.engines import subject_collate

    item = {"image": torch.rand(3, 4, 4, 4), "time": torch.tensor([0.0, 1.0, 2.0]), "subject": "s"}
    batch = subject_collate([item])
    assert batch["image"].shape == (1, 3, 4, 4, 4) and batch["subject"] == ["s"]
    assert batch["image"].data_ptr() == item["image"].data_ptr()  # no copy of the scans
    with pytest.raises(ValueError, match="subject_collate collates one subject item, got 2"):
        subject_collate([item, item])


def test_fit_and_prediction_run_on_the_device_and_return_cpu_tensors(device):
    synthetic = synthetic_sequence(spatial_dims=3, size=16, kind="cardiac", seed=0, times=[0, 1, 2, 3])
    sequence = SubjectSequence.from_tensors(synthetic.images, synthetic.times, subject="device")
    config = FitConfig(epochs=4, levels=(2, 1), level_fractions=(0.5, 0.5), ncc_kernel_size=5)
    fitted = fit_sequence(sequence, config, network=SMALL_NETWORK, device=device, progress=False)
    assert all(p.device.type == device.type for p in fitted.model.parameters())
    assert fitted.template.device.type == device.type and len(fitted.history) == 4
    assert all(math.isfinite(r["total"]) for r in fitted.history)
    prediction = fitted.predict([0.5, 3.5], labels=synthetic.label)
    assert prediction.images.device.type == "cpu" and prediction.labels.shape == (2, 1, 16, 16, 16)
    assert torch.isfinite(prediction.jacobians).all()
