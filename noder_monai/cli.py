"""The ``noder`` command: fit, predict, evaluate, run the demo, pretrain the autoencoder.

Every verb is a job of :mod:`noder_monai.engines.jobs` (or :mod:`noder_monai.engines.pretrain`): ``noder fit``
runs the bundle's trainer (``bundle/configs/train.json``'s ``NODERTrainer`` and handlers) once per subject, and
``noder predict`` writes the predictions ``bundle/configs/inference.json`` writes.
``noder <verb> --help`` explains the verb's arguments. Examples::

    noder demo
    noder fit data/datalist.json --output_dir runs --epochs 100 --threads 2
    noder predict data/datalist.json --output_dir runs --times "[1.0, 2.5, 8.0]"
    noder evaluate data/datalist.json --output_dir runs --eval_dir runs/eval
    noder pretrain runs/autoencoder --epochs 5
    torchrun --nproc_per_node=2 -m noder_monai.cli fit data/datalist.json --output_dir runs

Under ``torchrun`` each process takes a cost-balanced share of the subjects (``engines.distributed``); finished
subjects are skipped on a rerun; a failing subject is recorded and the exit status is the number that failed.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

__all__ = ["fit", "predict", "evaluate", "demo", "pretrain", "main", "COMMANDS"]


def fit(
    datalist: str,
    dataset_dir: str | None = None,
    output_dir: str = "noder_outputs",
    pretrained: str | None = "auto",
    device: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    skip_existing: bool = False,
    progress: bool = True,
    **settings: Any,
) -> None:
    """Fit a NODER trajectory to every subject of a datalist.

    Writes per subject <output_dir>/<id>/model.pt (the fitted subject), loss.csv and loss.json (the loss per
    epoch) and fitted/image_t<time>.nii.gz (the fit at each observed time, in the input's affine and units).

    Args:
        datalist: JSON datalist: {"subjects": [{"id", "scans": [{"image", "time"}, ...], "label"?, "heldout"?,
            "predict_times"?}]}; at least two scans per subject, times strictly increasing.
        dataset_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        output_dir: where the per-subject folders are written.
        pretrained: deformation-autoencoder file for the encoder/decoder; "auto" uses the weights shipped with
            the package when installed; None starts from random weights.
        device: torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu).
        seed: random seed of every fit.
        threads: torch CPU threads (default: the cores idle at start, i.e. cores minus the load average).
        skip_existing: also keep subjects whose model.pt exists without a done-marker (older outputs); subjects
            with a done-marker for the same settings and scans are always skipped, so a rerun resumes.
        progress: show a progress bar per subject.
        settings: fit settings (epochs, learning_rate, ncc_kernel_size, smoothness_weight, boundary_weight,
            levels, level_fractions, patience, min_improvement, finetune_decoder) and network settings
            (latent_channels, encoder_channels, decoder_channels, dynamics_channels, hidden_features,
            num_hidden_layers, smoothing_kernel, step_size, adjoint, field, integration_steps),
            e.g. --epochs 100 --levels "[2,1]" --level_fractions "[0.5,0.5]".
    """
    from noder_monai.engines import jobs

    fit_settings, network = jobs.split_settings(**settings)
    summary = jobs.train(
        datalist=datalist, dataset_dir=dataset_dir, output_dir=output_dir, network=network, fit=fit_settings,
        pretrained=pretrained, device=device, seed=seed, num_threads=threads, skip_existing=skip_existing,
        progress=progress,
    )
    for subject, record in summary.items():
        if record.get("status") in ("done", "skipped") and "epochs" in record:
            print(f"{subject}: {record['epochs']} epochs, final loss {record['final_loss']:.5f}, "
                  f"{record['seconds']:.1f} s -> {record['model']}" + (" (finished earlier)" if record["status"] == "skipped" else ""))
        else:
            print(f"{subject}: {_status_line(record)}")
    print(f"outputs: {os.path.abspath(output_dir)}")
    _exit_on_failures(summary)


def _status_line(record: dict) -> str:
    return f"{record.get('status')}" + (f": {record['error']}" if record.get("error") else "")


def _exit_on_failures(records: dict) -> None:
    """Exit with the number of failed subjects (capped at 100) when any failed (see cohort_summary_<stage>.json)."""
    import sys

    failed = [k for k, v in records.items() if v.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} subject(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(min(len(failed), 100))


def predict(
    datalist: str,
    dataset_dir: str | None = None,
    output_dir: str = "noder_outputs",
    times: Sequence[float] | None = None,
    device: str | None = None,
    threads: int | None = None,
    batch_size: int = 8,
) -> None:
    """Predict every fitted subject at query times: images, displacement fields, Jacobian maps, carried labels.

    Needs `noder fit` with the same output_dir first. Writes <output_dir>/<id>/predictions/
    {image,ddf,jacobian,label}_t<time>.nii.gz (input affine; ddf in voxels, channels last with NIfTI intent
    vector), predictions.json and, when the subject has a label map, label_volumes.csv.

    Args:
        datalist: the datalist used for fitting.
        dataset_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        output_dir: the folder `noder fit` wrote to.
        times: query times, e.g. "[1.0, 2.5]", for subjects without their own predict_times in the datalist
            (default: each subject's observed and held-out times).
        device: torch device (default: cuda if available, else cpu).
        threads: torch CPU threads (default: the cores idle at start, i.e. cores minus the load average).
        batch_size: time points decoded and warped at once (lower it if memory is short).
    """
    from noder_monai.engines import jobs

    if isinstance(times, (int, float)):
        times = [times]
    summary = jobs.infer(
        datalist=datalist, dataset_dir=dataset_dir, output_dir=output_dir, predict_times=times, device=device,
        num_threads=threads, batch_size=batch_size,
    )
    for subject, record in summary.items():
        if record.get("images"):
            folder = os.path.dirname(record["images"][0])
            print(f"{subject}: {len(record['times'])} time point(s) {record['times']} -> {folder}")
        else:
            print(f"{subject}: {_status_line(record)}")
    _exit_on_failures(summary)


def evaluate(
    datalist: str,
    dataset_dir: str | None = None,
    output_dir: str = "noder_outputs",
    eval_dir: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    montage: bool = True,
) -> None:
    """Score every fitted subject on its held-out scans (NRMSE, SSIM, PSNR, % folded voxels) and print the table.

    Needs `noder fit` with the same output_dir first and "heldout" scans in the datalist. Writes metrics.json,
    metrics.md and one <id>_montage.png per subject (rows: held-out times; columns: observed, predicted,
    predicted - observed in blue/white/red) to eval_dir.

    Args:
        datalist: the datalist used for fitting, with "heldout" scans.
        dataset_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        output_dir: the folder `noder fit` wrote to.
        eval_dir: where the report is written (default: <output_dir>/eval).
        device: torch device (default: cuda if available, else cpu).
        threads: torch CPU threads (default: the cores idle at start, i.e. cores minus the load average).
        montage: write the PNG montages (--nomontage to skip).
    """
    from noder_monai.engines import jobs
    from noder_monai.engines.report import markdown_table

    eval_dir = eval_dir or os.path.join(output_dir, "eval")
    report = jobs.evaluate(
        datalist=datalist, dataset_dir=dataset_dir, output_dir=output_dir, eval_dir=eval_dir, device=device,
        num_threads=threads, montage=montage,
    )
    if "overall" in report:  # rank 0 (or a single process): the cohort report
        print(markdown_table(report))
        print(f"report: {os.path.join(os.path.abspath(eval_dir), 'metrics.json')}")
    _exit_on_failures({subject: {"status": "failed"} for subject in report["failed"]})


def demo(
    directory: str = "noder_demo",
    subjects: int = 2,
    size: int = 64,
    pretrained: str | None = "auto",
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    **settings: Any,
) -> None:
    """Run everything on the synthetic demo: make the data (if absent), fit, predict, evaluate, print the metrics.

    The demo subjects are the shipped Colin27 head deformed by a known, non-linear atrophy-like trajectory, with
    three held-out scans each (two between visits, one after the last). Takes a few minutes on a laptop CPU.

    Args:
        directory: folder for data/, outputs/ and eval/.
        subjects: number of demo subjects.
        size: edge of the demo volumes in voxels (64 is the shipped resolution).
        pretrained: autoencoder file, "auto" (shipped weights when installed) or None (random weights).
        device: torch device (default: cuda if available, else cpu).
        threads: torch CPU threads (default: the cores idle at start, i.e. cores minus the load average).
        progress: show a progress bar per subject.
        settings: fit and network settings as for `noder fit`, e.g. --epochs 100.
    """
    from noder_monai.engines import jobs

    fit_settings, network = jobs.split_settings(**settings)
    result = jobs.run_demo(
        directory=directory, n_subjects=subjects, size=size, network=network, fit=fit_settings,
        pretrained=pretrained, device=device, num_threads=threads, progress=progress,
    )
    print(result["table"])
    print(f"data:        {result['datalist']}")
    print(f"models:      {result['output_dir']}/<subject>/model.pt")
    print(f"predictions: {result['output_dir']}/<subject>/predictions/")
    print(f"report:      {result['eval_dir']}/metrics.md and <subject>_montage.png")
    print("seconds:     " + ", ".join(f"{stage} {value:.1f}" for stage, value in result["seconds"].items()))


def pretrain(
    output_dir: str,
    fields: str | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    **settings: Any,
) -> None:
    """Pretrain the deformation autoencoder that NODER's encoder/decoder start from.

    Writes autoencoder.pt (best validation weights; pass it to `noder fit --pretrained`), checkpoint.pt and
    history.json to output_dir. See bundle/docs/pretraining.md.

    Args:
        output_dir: folder of the weights, checkpoint and history.
        fields: None trains on generated smooth fields; or your displacement fields (a folder of NIfTI files, a
            JSON datalist {"training": [...], "validation": [...]}, or a list of files).
        device: torch device (default: cuda if available, else cpu).
        resume: continue from output_dir/checkpoint.pt if it exists (--noresume starts again).
        progress: show a progress bar.
        settings: PretrainConfig fields, e.g. --epochs 30 --spatial_dims 3 --spatial_size 32 --batch_size 8.
    """
    from noder_monai.engines import pretrain as pretraining
    from noder_monai.utils import resolve_device

    result = pretraining.pretrain_autoencoder(
        output_dir, fields=fields, device=resolve_device(device), resume=resume, progress=progress, **settings
    )
    print(f"autoencoder: {result.autoencoder} (epoch {result.best_epoch}, validation endpoint error "
          f"{result.best_validation_epe:.4f} voxels)")


COMMANDS = {"fit": fit, "predict": predict, "evaluate": evaluate, "demo": demo, "pretrain": pretrain}
"""The verbs of the ``noder`` command."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``noder`` console script (``argv`` defaults to ``sys.argv[1:]``)."""
    import sys

    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv and any(flag in argv for flag in ("-h", "--help")):
        # fire reads `noder fit --help` as a value for **settings; its own spelling is `noder fit -- --help`
        argv = [arg for arg in argv if arg not in ("-h", "--help")] + ["--", "--help"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(COMMANDS, command=argv, name="noder")


if __name__ == "__main__":
    main()
