"""The memory guard refuses an oversize fit before allocating; prediction holds one chunk of working memory."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from noder_monai.engines import memory
from noder_monai.engines.levels import SIMILARITY_VOXELS, similarity_region_voxels
from noder_monai.data import IntensityMapping, SubjectSequence
from noder_monai.engines import fit_sequence
from noder_monai.model import FittedSubject
from noder_monai.networks import NODER


class PeakTensorBytes(TorchDispatchMode):
    """The peak, in bytes, of the storages of the tensors that the operations inside the block create and that are
    alive at once (a count of what is materialised, independent of the allocator and the machine)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _subject(size: int, device: torch.device) -> FittedSubject:
    torch.manual_seed(0)
    model = NODER((size,) * 3)
    model.set_initial_state()
    with torch.no_grad():
        model.dynamics.head.weight.normal_(0, 0.05)
    model = model.to(device).eval()
    baseline = torch.rand(1, 1, size, size, size, device=device)
    return FittedSubject(model, baseline, torch.tensor([0.0, 1.0, 2.0]), torch.eye(4), IntensityMapping(0.0, 1.0))


def test_predict_of_50_times_at_64_cubed_holds_one_chunk_of_working_memory():
    subject, voxels = _subject(64, torch.device("cpu")), 64**3
    times = torch.linspace(-0.5, 2.5, 50).tolist()
    with PeakTensorBytes() as one_chunk:
        subject.predict(times[:4], batch_size=4)
    with PeakTensorBytes() as fifty:
        prediction = subject.predict(times, batch_size=4)
    outputs = sum(t.untyped_storage().nbytes() for t in (prediction.images, prediction.ddfs, prediction.jacobians))
    assert outputs == 50 * 5 * voxels * 4  # image, 3 field components and the Jacobian map per time, float32
    chunk_outputs = 4 * 5 * voxels * 4
    working = one_chunk.peak - chunk_outputs
    assert 0 < working < 40 * 4 * voxels * 4  # a bounded multiple of one chunk's fields
    # beyond its outputs, predicting 50 times holds what predicting one chunk does (that chunk's working memory and
    # its outputs before they are copied into the result): it does not grow with the number of times
    assert fifty.peak - outputs <= one_chunk.peak * 1.05 + 2**20
    sizes = []
    with PeakTensorBytes() as streamed:
        for chunk in subject.predict_chunks(times, batch_size=4):
            sizes.append(len(chunk.times))
            del chunk  # a consumer that writes each chunk and lets it go
    assert sizes == [4] * 12 + [2]
    assert streamed.peak <= one_chunk.peak * 1.05 + 2**20  # one chunk at a time, whatever the number of times
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        subject.predict_chunks(times, batch_size=0)


def test_the_guard_refuses_an_oversize_fit_before_allocating(monkeypatch):
    size = (182, 218, 182)
    estimate = memory.fit_memory_estimate(size, 6, similarity_region_voxels(size, SIMILARITY_VOXELS, 10))
    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": estimate // 2)
    ramp = torch.arange(182.0).view(1, 1, 182, 1, 1).expand(6, 1, 182, 1, 1).clone()
    images = ramp.expand(6, 1, *size)  # 6 x 182 floats behind a view of the full size: no image-sized allocation
    sequence = SubjectSequence.from_tensors(images, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], subject="big")
    with PeakTensorBytes() as allocated, pytest.raises(ValueError) as error:
        fit_sequence(sequence, pretrained=None, progress=False)
    message = str(error.value)
    assert f"subject 'big': a fit of 6 scans of 182x218x182 voxels needs about {estimate / 2**30:.1f} GB" in message
    assert f"only {estimate // 2 / 2**30:.1f} GB is free on cpu" in message
    assert "fit fewer scans at once (about 0.16 GB less per scan" in message and "a coarser finest level" in message
    assert allocated.peak < 2**20  # refused before any image-sized tensor was made


def test_estimate_grows_with_voxels_and_scans_and_free_memory_reads_meminfo(tmp_path):
    small, big = memory.fit_memory_estimate((64, 64, 64), 6), memory.fit_memory_estimate((128, 128, 128), 6)
    assert small < big < 8 * small + memory.FIT_BYTES_FIXED
    assert memory.fit_memory_estimate((64, 64, 64), 9) > small
    # the similarity's region: the whole grid up to about twice the budget, then the box widened by the NCC radius
    assert similarity_region_voxels((64, 64, 64), SIMILARITY_VOXELS, 10) == 64**3
    assert similarity_region_voxels((80, 80, 80), SIMILARITY_VOXELS, 10) == 80**3
    assert similarity_region_voxels((128, 128, 128), SIMILARITY_VOXELS, 10) == 84**3
    assert similarity_region_voxels((128, 128, 128), None, 10) == 128**3
    boxed = memory.fit_memory_estimate((128, 128, 128), 6, 84**3, source="template")
    assert big - boxed == (128**3 - 84**3) * memory.FIT_BYTES_PER_SIMILARITY_VOXEL
    # choosing the appearance (source="auto") holds every scan's field and inverse field at once
    auto = memory.fit_memory_estimate((128, 128, 128), 6, 84**3)
    assert auto == 128**3 * 6 * memory.CHOICE_BYTES_PER_VOXEL_SCAN + memory.CHOICE_BYTES_FIXED > boxed
    with pytest.raises(ValueError, match="scans must be >= 2"):
        memory.fit_memory_estimate((64, 64, 64), 1)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   12345678 kB\n")
    assert memory._meminfo_available(str(meminfo)) == 12345678 * 1024
    assert memory._meminfo_available(str(tmp_path / "missing")) is None
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert memory._cgroup_available(str(tmp_path)) == 600000
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_available(str(tmp_path)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_cuda_stays_within_one_chunk_of_device_memory():
    device = torch.device("cuda")
    subject, voxels = _subject(64, device), 64**3
    times = torch.linspace(-0.5, 2.5, 50).tolist()
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    prediction = subject.predict(times, batch_size=4)
    assert prediction.images.device.type == "cpu"
    assert torch.cuda.max_memory_allocated(device) - start < 40 * 4 * voxels * 4
    assert memory.free_memory(device) > 0
